"""The scaling plot of scripts/bench.py --scaling: rlhf-loop's iteration time (stacked by stage) against the
responses per iteration (prompts x K), with a least-squares line through the origin-free fit, and a verdict on how
linear it is."""

from __future__ import annotations

from pathlib import Path

LINEAR_R2 = 0.98  # a straight-line fit this good or better is "about linear"


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Slope, intercept and R^2 of the least-squares line."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = mean_y - slope * mean_x
    total = sum((y - mean_y) ** 2 for y in ys)
    residual = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, intercept, 1.0 - residual / total if total else 1.0


def plot_scaling(points: list[dict], path: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["responses"] for p in points]
    ys = [p["work_s"] for p in points]
    slope, intercept, r2 = linear_fit(xs, ys)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    bottom = [0.0] * len(points)
    width = [0.06 * max(xs)] * len(points)
    for key, label in (("generate_s", "generate"), ("score_s", "score"), ("train_s", "train"), ("sync_s", "sync")):
        heights = [p.get(key) or 0.0 for p in points]
        ax.bar(xs, heights, width=width, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.bar(xs, [y - b for y, b in zip(ys, bottom, strict=True)], width=width, bottom=bottom, label="other",
           color="lightgray")
    line_x = [0, max(xs) * 1.05]
    ax.plot(line_x, [intercept + slope * x for x in line_x], "k--", linewidth=1,
            label=f"fit: {intercept:.1f} s + {1000 * slope:.1f} ms/response (R² {r2:.3f})")
    for p in points:
        ax.annotate(f"{p['prompts']}x{p['samples_per_prompt']}", (p["responses"], p["work_s"]),
                    textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.set_xlabel("responses per iteration (prompts x K), 64 new tokens each")
    ax.set_ylabel("iteration wall time (s)")
    ax.set_title("rlhf-loop iteration time against prompts x K (2-core CPU, 4.7M Llama)")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xlim(0, max(xs) * 1.1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    linear = r2 >= LINEAR_R2
    summary = (f"iteration time = {intercept:.2f} s + {1000 * slope:.2f} ms x responses, R^2 {r2:.3f}: "
               f"{'about linear' if linear else 'not linear'}; plot: {path}")
    return {"slope_s_per_response": slope, "intercept_s": intercept, "r2": r2, "about_linear": linear,
            "summary": summary}
