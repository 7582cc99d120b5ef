"""Online vs offline DPO on the toy task with a gold reward: do fresh on-policy pairs pay?

    python scripts/compare_online_offline.py [--seeds 0 1 2 3 4] [--runs-dir runs/compare]

Runs configs/tiny_online.yaml (3 iterations of online DPO) and configs/tiny_offline.yaml (one round of DPO on the same
total number of pairs, all sampled from pi_0) once per seed, then prints the held-out gold reward (`eval/gold_mean`)
per iteration as mean +- standard error over seeds, then what else moved by the end (KL to pi_0, length, reward-model
score) and the verdict. Finished runs are reused and unfinished ones resumed, so the script can be stopped and started
again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"online": REPO / "configs" / "tiny_online.yaml", "offline": REPO / "configs" / "tiny_offline.yaml"}


def run(config: Path, seed: int, run_dir: Path) -> None:
    """Run (or finish) one config with one seed."""
    from rlhf_loop.status import run_status

    if (run_dir / "manifest.json").exists():
        if run_status(str(run_dir))["finished"]:
            return
        command = ["resume", str(run_dir)]
    else:
        command = ["run", str(config), f"seed={seed}", "--run-dir", str(run_dir)]
    print(f"$ rlhf-loop {' '.join(command)}", file=sys.stderr, flush=True)
    # The runs' own output goes to stderr, so stdout holds only the tables.
    subprocess.run([sys.executable, "-m", "rlhf_loop.cli", *command], check=True, cwd=REPO, stdout=sys.stderr)


def gold_curve(run_dir: Path) -> list[float]:
    """eval/gold_mean of pi_0 (iteration 0), then after each iteration."""
    units = json.loads((run_dir / "manifest.json").read_text())["units"]
    curve = [units["eval_initial"]["metrics"]["eval/gold_mean"]]
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        curve.append(json.loads(line)["eval/gold_mean"])
    return curve


# What moved besides gold, after the last iteration: how far from pi_0 (kl/ref), whether length was gamed, and what the
# reward model thinks; these tell apart a policy that improved from one that drifted where the reward model is blind.
# dpo/chosen_reward below zero means DPO lowered the likelihood of the very responses it was told to prefer.
DIAGNOSTICS = ("kl/ref", "dpo/chosen_reward", "eval/response_tokens_mean", "eval/reward_mean",
               "eval/win_rate_vs_initial")


def final_metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def table(curves: dict[str, list[list[float]]]) -> str:
    iterations = max(len(curve) for per_seed in curves.values() for curve in per_seed)
    seeds = len(next(iter(curves.values())))
    lines = [f"eval/gold_mean on held-out prompts, mean +- standard error over {seeds} seeds", "",
             "| iteration | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for i in range(iterations):
        cells = []
        for per_seed in curves.values():
            values = [curve[i] for curve in per_seed if i < len(curve)]
            cells.append("{:.3f} +- {:.3f}".format(*mean_and_standard_error(values)) if values else "")
        lines.append(f"| {i if i else '0 (pi_0)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_table(finals: dict[str, list[dict[str, float]]]) -> str:
    lines = ["after the last iteration, mean +- standard error over seeds", "",
             "| metric | " + " | ".join(finals) + " |", "|---|" + "---|" * len(finals)]
    for key in DIAGNOSTICS:
        cells = ["{:.3f} +- {:.3f}".format(*mean_and_standard_error([m[key] for m in per_seed]))
                 for per_seed in finals.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(curves: dict[str, list[list[float]]]) -> str:
    online = [curve[-1] for curve in curves["online"]]
    offline = [curve[-1] for curve in curves["offline"]]
    (on_mean, on_se), (off_mean, off_se) = mean_and_standard_error(online), mean_and_standard_error(offline)
    gap, gap_se = on_mean - off_mean, math.sqrt(on_se**2 + off_se**2)
    per_iteration = [statistics.fmean(curve[i] for curve in curves["online"]) for i in range(len(curves["online"][0]))]
    rising = all(b > a for a, b in zip(per_iteration, per_iteration[1:]))
    return (f"final gold: online {on_mean:.3f} +- {on_se:.3f}, offline {off_mean:.3f} +- {off_se:.3f}; "
            f"online - offline = {gap:.3f} +- {gap_se:.3f} ({gap / gap_se:.1f} standard errors)\n"
            f"online gold rises every iteration: {'yes' if rising else 'no'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "compare")
    args = parser.parse_args()
    curves: dict[str, list[list[float]]] = {name: [] for name in CONFIGS}
    finals: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    for seed in args.seeds:
        for name, config in CONFIGS.items():
            run_dir = args.runs_dir / f"{name}-seed{seed}"
            run(config, seed, run_dir)
            curves[name].append(gold_curve(run_dir))
            finals[name].append(final_metrics(run_dir))
    print(table(curves))
    print()
    print(diagnostics_table(finals))
    print()
    print(verdict(curves))
    return 0


if __name__ == "__main__":
    sys.exit(main())
