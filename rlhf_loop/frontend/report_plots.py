"""The report's figures, each rendered to PNG bytes on matplotlib's Agg canvas.

Figures are built on `matplotlib.figure.Figure` directly, not through pyplot: no display is needed and no global
figure state is left behind. Every function takes plain numbers keyed by iteration and knows nothing of run
directories; iterations with no data are simply absent from its input.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

DPI = 100
WIDTH = 7.5  # inches: two figures side by side fit a laptop screen at DPI
CHOSEN, REJECTED = "tab:green", "tab:red"
BOX_ROOM = 1.0  # x-axis room beside the outer boxes, in iterations: a lone iteration's box does not fill the plot


def _figure(height: float = 3.6) -> Figure:
    figure = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _iteration_axis(axes, iterations) -> None:
    """Whole-number ticks, and half an iteration of room each side (a single point would get ticks at +-0.04)."""
    axes.set_xlabel("iteration")
    axes.set_xlim(min(iterations) - 0.5, max(iterations) + 0.5)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axes.grid(True, alpha=0.3)


def _finite(values: dict[int, float]) -> dict[int, float]:
    return {key: value for key, value in sorted(values.items()) if value is not None and math.isfinite(value)}


def _finite_lists(values: dict[int, Sequence[float]]) -> dict[int, list[float]]:
    """NaN scores (e.g. an offline run's pairs from a dataset without scores) are dropped, then empty iterations."""
    values = {key: [value for value in group if math.isfinite(value)] for key, group in values.items()}
    return {key: group for key, group in values.items() if group}


def reward_distribution(scores: dict[int, Sequence[float]]) -> bytes | None:
    """One box per iteration over every scored response (whiskers 5-95%, the triangle is the mean)."""
    scores = _finite_lists(scores)
    if not scores:
        return None
    figure = _figure()
    axes = figure.add_subplot()
    iterations = sorted(scores)
    axes.boxplot([scores[i] for i in iterations], positions=iterations, widths=0.5, whis=(5, 95), showmeans=True,
                 showfliers=False, tick_labels=[f"{i}\n(n={len(scores[i])})" for i in iterations])
    axes.set_xlim(iterations[0] - BOX_ROOM, iterations[-1] + BOX_ROOM)
    axes.set_ylabel("reward")
    axes.set_title("Reward of every sampled response")
    axes.set_xlabel("iteration")
    axes.grid(True, axis="y", alpha=0.3)
    return _png(figure)


def chosen_vs_rejected(chosen: dict[int, Sequence[float]], rejected: dict[int, Sequence[float]]) -> bytes | None:
    """The reward-model scores of each iteration's chosen and rejected responses, side by side, means joined."""
    chosen, rejected = _finite_lists(chosen), _finite_lists(rejected)
    iterations = sorted(chosen.keys() & rejected.keys())
    if not iterations:
        return None
    figure = _figure()
    axes = figure.add_subplot()
    for offset, values, colour in ((-0.18, chosen, CHOSEN), (0.18, rejected, REJECTED)):
        positions = [i + offset for i in iterations]
        boxes = axes.boxplot([values[i] for i in iterations], positions=positions, widths=0.3, whis=(5, 95),
                             showfliers=False, patch_artist=True, manage_ticks=False)
        for box in boxes["boxes"]:
            box.set(facecolor=colour, alpha=0.35, edgecolor=colour)
        for median in boxes["medians"]:
            median.set(color=colour)
        axes.plot(positions, [sum(values[i]) / len(values[i]) for i in iterations], "o-", color=colour, markersize=4)
    axes.set_xticks(iterations, [f"{i}\n({len(chosen[i])} pairs)" for i in iterations])
    axes.set_xlim(iterations[0] - BOX_ROOM, iterations[-1] + BOX_ROOM)
    axes.set_xlabel("iteration")
    axes.set_ylabel("reward")
    axes.set_title("Chosen vs rejected reward (boxes 25-75%, whiskers 5-95%, dots the means)")
    axes.legend(handles=[Patch(color=CHOSEN, alpha=0.5, label="chosen"),
                         Patch(color=REJECTED, alpha=0.5, label="rejected")],
                loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")  # outside: boxes fill the axes
    axes.grid(True, axis="y", alpha=0.3)
    return _png(figure)


def dpo_training(chunks: Sequence[dict[str, float]]) -> bytes | None:
    """Per training chunk: loss, reward accuracy and the implicit rewards, against the run's global step.

    Each chunk has `iteration`, `global_step` (at its end), `steps` and the learner's averaged statistics."""
    if not chunks:
        return None
    figure = _figure(height=6.6)
    loss, accuracy, rewards = figure.subplots(3, 1, sharex=True)
    steps = [chunk["global_step"] for chunk in chunks]
    loss.plot(steps, [chunk.get("loss", math.nan) for chunk in chunks], "o-", markersize=3)
    loss.set_ylabel("DPO loss")
    accuracy.plot(steps, [chunk.get("reward_accuracy", math.nan) for chunk in chunks], "o-", markersize=3)
    accuracy.set_ylabel("reward accuracy")
    accuracy.set_ylim(-0.05, 1.05)
    for key, style, colour in (("margin", "o-", "tab:blue"), ("chosen_reward", "--", CHOSEN),
                               ("rejected_reward", "--", REJECTED)):
        rewards.plot(steps, [chunk.get(key, math.nan) for chunk in chunks], style, color=colour, markersize=3,
                     label=key.replace("_", " "))
    rewards.axhline(0.0, color="grey", linewidth=0.8)
    rewards.set_ylabel("implicit reward")
    rewards.legend(loc="best", fontsize="small")
    starts = {}
    for chunk in chunks:
        starts.setdefault(chunk["iteration"], chunk["global_step"] - chunk["steps"])
    for axes in (loss, accuracy, rewards):
        axes.grid(True, alpha=0.3)
        for start in list(starts.values())[1:]:
            axes.axvline(start, color="grey", linestyle=":", linewidth=1)
    loss.set_xlim(left=min(starts.values()))  # from the first iteration's start, where its label goes
    for iteration, start in starts.items():
        loss.annotate(f"iter {iteration}", (start, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                      textcoords="offset points", va="top", fontsize="small", color="grey")
    rewards.set_xlabel("optimizer step (over the whole run)")
    rewards.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss.set_title("DPO training, one point per checkpointed chunk")
    return _png(figure)


def kl_to_reference(kl: dict[int, float]) -> bytes | None:
    kl = _finite(kl)
    if not kl:
        return None
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot(list(kl), list(kl.values()), "o-")
    axes.set_ylabel("KL to reference (nats)")
    axes.set_title("KL(policy || reference) on fresh evaluation samples")
    _iteration_axis(axes, kl)
    return _png(figure)


def response_length(rollout: dict[int, float], evaluation: dict[int, float]) -> bytes | None:
    rollout, evaluation = _finite(rollout), _finite(evaluation)
    if not rollout and not evaluation:
        return None
    figure = _figure()
    axes = figure.add_subplot()
    if rollout:
        axes.plot(list(rollout), list(rollout.values()), "o-", label="rollouts (sampled before the iteration trains)")
    if evaluation:
        axes.plot(list(evaluation), list(evaluation.values()), "s-", label="evaluation (after it trains; 0 = pi_0)")
    axes.set_ylabel("mean response tokens")
    axes.set_title("Response length")
    axes.legend(loc="best", fontsize="small")
    _iteration_axis(axes, [*rollout, *evaluation])
    return _png(figure)


def evaluation_curves(curves: dict[str, dict[int, float]]) -> bytes | None:
    """One panel per evaluation metric (gold, reward, win rate), iteration 0 being pi_0."""
    curves = {name: _finite(values) for name, values in curves.items()}
    curves = {name: values for name, values in curves.items() if values}
    if not curves:
        return None
    figure = _figure()
    panels = figure.subplots(1, len(curves), sharex=True, squeeze=False)[0]
    for index, (axes, (name, values)) in enumerate(zip(panels, curves.items(), strict=True), start=1):
        axes.plot(list(values), list(values.values()), "o-", color=f"C{index}")
        if name.endswith("win_rate_vs_initial"):
            axes.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        axes.set_title(name, fontsize="medium")
        _iteration_axis(axes, [iteration for values in curves.values() for iteration in values])
    figure.suptitle("Held-out evaluation")
    return _png(figure)


def stage_times(times: dict[int, dict[str, float]], stages: Sequence[tuple[str, str]]) -> bytes | None:
    """Stacked seconds per iteration: `stages` are (metric key, label) pairs; `time/iteration_s` beyond their sum
    (pairs, export, bookkeeping) is stacked on top as "other"."""
    if not times:
        return None
    figure = _figure()
    axes = figure.add_subplot()
    iterations = sorted(times)
    bottom = [0.0] * len(iterations)
    for key, label in stages:
        heights = [times[i].get(key, 0.0) for i in iterations]
        axes.bar(iterations, heights, bottom=bottom, label=label, width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    other = [max(times[i].get("time/iteration_s", 0.0) - b, 0.0) for i, b in zip(iterations, bottom, strict=True)]
    if any(other):
        axes.bar(iterations, other, bottom=bottom, label="other", width=0.6, color="lightgrey")
    axes.set_ylabel("seconds")
    axes.set_title("Time per stage (summed over every process, resumed ones included)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    _iteration_axis(axes, iterations)
    return _png(figure)
