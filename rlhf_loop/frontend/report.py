"""`rlhf-loop report RUN_DIR`: one HTML page with PNG plots of a run, written to RUN_DIR/report/.

The page has the reward distribution, chosen vs rejected rewards, DPO training curves, KL to the reference,
response lengths, evaluation curves and stage times, a metrics table with a row per finished iteration, and a few
sample pairs per iteration. Every text that comes from the run is HTML-escaped: responses are model output.
The report is built in a temporary directory inside the run directory and renamed into place, so a reader never
sees a half-written one; running the command again replaces it.

Read top to bottom: write_report; the run as recorded (`read_run`: only the units its manifest records as finished,
so a run still going or stopped gives what it has so far, and a recorded file that is missing or unreadable is left
out with a note for the page, never an exception); the figures (`make_plots`, each figure a function of plain
numbers keyed by iteration, drawn on matplotlib's Agg canvas without pyplot: no display, no global figure state);
the page.
"""

from __future__ import annotations

import html
import io
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from rlhf_loop.common import records
from rlhf_loop.common.files import atomic_directory, atomic_write_bytes, atomic_write_text, read_jsonl
from rlhf_loop.common.records import Pair, Response
from rlhf_loop.driver.stages import EVAL_INITIAL, STAGE_TIMES
from rlhf_loop.rundir.manifest import Manifest, RunDir, iteration_of, unit_order

REPORT_DIR = "report"
MAX_TEXT_CHARS = 2000  # longer prompts and responses are cut, so a run of long answers keeps a readable page
EVAL_CURVES = ("eval/gold_mean", "eval/reward_mean", "eval/win_rate_vs_initial")


_UNREADABLE = (OSError, ValueError, KeyError, TypeError)  # a file gone, cut short, or not of the record's shape

Record = TypeVar("Record")


DPI = 100
WIDTH = 7.5  # inches: two figures side by side fit a laptop screen at DPI
CHOSEN, REJECTED = "tab:green", "tab:red"
BOX_ROOM = 1.0  # x-axis room beside the outer boxes, in iterations: a lone iteration's box does not fill the plot


@dataclass(frozen=True)
class Plot:
    name: str  # the PNG's file stem
    title: str
    caption: str
    png: bytes | None  # None: nothing recorded to plot yet
    missing: str  # what the page says in its place


def write_report(root: str | os.PathLike) -> Path:
    """Write RUN_DIR/report/ (index.html and its PNGs), replacing an earlier report; returns index.html's path."""
    run = read_run(root)
    plots = make_plots(run)
    target = run.root / REPORT_DIR
    with atomic_directory(target) as staging:  # readers see one report or the other, never a mix
        for plot in plots:
            if plot.png is not None:
                atomic_write_bytes(staging / f"{plot.name}.png", plot.png)
        atomic_write_text(staging / "index.html", render_page(run, plots))
        # a report is for sharing, e.g. from a web server's directory
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
    return target / "index.html"


# ---- the run, as recorded ------------------------------------------------------------------------------------------

@dataclass
class TrainChunk:
    """One checkpointed chunk of DPO steps, as the manifest recorded it."""

    iteration: int
    global_step: int  # optimizer steps over the whole run at the chunk's end
    stats: dict[str, float]  # loss, reward_accuracy, margin, chosen_reward, rejected_reward, learning_rate, steps


@dataclass
class IterationData:
    iteration: int
    finished: bool
    scores: list[float] = field(default_factory=list)  # every scored response of the recorded score shards
    response_tokens: list[int] = field(default_factory=list)  # their lengths, in the same order
    score_shards: int = 0
    score_shards_total: int | None = None
    pairs: list[Pair] | None = None  # None: the pairs unit is not recorded (or its file is unreadable)
    train_chunks: list[TrainChunk] = field(default_factory=list)
    eval_metrics: dict[str, float] | None = None
    metrics: dict[str, float] | None = None  # iter_NNN/metrics.json: only once the iteration is finished


@dataclass
class RunData:
    root: Path
    config_text: str
    iterations_planned: int | None
    initial_eval: dict[str, float] | None
    iterations: list[IterationData]
    notes: list[str]  # what is missing or unreadable, for the page

    @property
    def finished(self) -> list[IterationData]:
        return [data for data in self.iterations if data.finished]


def read_run(root: str | Path) -> RunData:
    """Everything the report shows; a directory that is not a run raises the usual one-line UserError."""
    run_dir = RunDir.existing(root)
    units = Manifest.load(run_dir).units
    notes: list[str] = []
    config_text, planned = _read_config(run_dir, notes)
    numbers = sorted({number for unit in units if (number := iteration_of(unit)) is not None})
    iterations = []
    step_offset = 0
    for number in numbers:
        data = _read_iteration(run_dir, units, number, step_offset, notes)
        step_offset = data.train_chunks[-1].global_step if data.train_chunks else step_offset
        iterations.append(data)
        if not data.finished:
            notes.append(f"iteration {number} is not finished (the run is still going, or was stopped): "
                         + _missing_parts(data))
    if planned is not None and len(numbers) < planned:
        first = (numbers[-1] if numbers else 0) + 1
        notes.append(f"iterations {first} to {planned} of {planned} have not started" if first < planned
                     else f"iteration {planned} of {planned} has not started")
    initial_eval = units.get(EVAL_INITIAL, {}).get("metrics")
    if initial_eval is None and numbers:
        notes.append("no evaluation of pi_0 (eval_initial) recorded: curves start at iteration 1")
    return RunData(run_dir.root, config_text, planned, initial_eval, iterations, notes)


def _read_config(run_dir: RunDir, notes: list[str]) -> tuple[str, int | None]:
    try:
        text = run_dir.config_path.read_text(encoding="utf-8")
        planned = OmegaConf.create(text).get("iterations")
    except Exception as e:  # noqa: BLE001 - any YAML error: the report still shows what the manifest has
        notes.append(f"config.yaml could not be read ({type(e).__name__}: {e}); the planned iteration count is unknown")
        return "", None
    return text, planned if isinstance(planned, int) else None


def _read_iteration(run_dir: RunDir, units: dict[str, dict[str, Any]], iteration: int, step_offset: int,
                    notes: list[str]) -> IterationData:
    prefix = f"iter_{iteration:03d}/"
    data = IterationData(iteration, finished=prefix + "done" in units)

    shard_units = sorted((unit for unit in units if unit.startswith(prefix + "scores/")), key=unit_order)
    data.score_shards = len(shard_units)
    data.score_shards_total = units[shard_units[0]].get("of_shards") if shard_units else None
    for unit in shard_units:
        for scored in _unit_records(run_dir, units, unit, records.scored_from_json, notes) or []:
            data.scores += scored.scores
            data.response_tokens += [len(response.token_ids) for response in scored.rollout.responses]

    if prefix + "pairs" in units:
        data.pairs = _unit_records(run_dir, units, prefix + "pairs", records.pair_from_json, notes)

    for unit in sorted((unit for unit in units if unit.startswith(prefix + "train/step_")), key=unit_order):
        info = units[unit]
        stats = {key: value for key, value in info.items() if isinstance(value, (int, float))}
        step = int(unit.rsplit("_", 1)[1])
        data.train_chunks.append(TrainChunk(iteration, step_offset + step, stats))

    data.eval_metrics = units.get(prefix + "eval", {}).get("metrics")
    if data.finished:
        path = run_dir.iteration(iteration) / "metrics.json"
        try:
            data.metrics = json.loads(path.read_text(encoding="utf-8"))
        except _UNREADABLE as e:
            notes.append(f"{path.relative_to(run_dir.root)} could not be read ({e}); iteration {iteration} is "
                         f"missing from the metrics table and the stage times")
    return data


def _unit_records(run_dir: RunDir, units: dict[str, dict[str, Any]], unit: str,
                  decode: Callable[[dict], Record], notes: list[str]) -> list[Record] | None:
    """The records of the one JSONL file a finished unit wrote, or None (noted) when it cannot be read."""
    try:
        (entry,) = units[unit]["files"]
        return [decode(row) for row in read_jsonl(run_dir.root / entry["path"])]
    except _UNREADABLE as e:
        notes.append(f"{unit}: its file could not be read ({type(e).__name__}: {e}); left out")
        return None


def _missing_parts(data: IterationData) -> str:
    parts = []
    if data.score_shards_total is None:
        parts.append("no score shard yet")
    elif data.score_shards < data.score_shards_total:
        parts.append(f"{data.score_shards} of {data.score_shards_total} score shards")
    parts.append("no pairs yet" if data.pairs is None else f"{len(data.pairs)} pairs")
    steps = sum(chunk.stats.get("steps", 0) for chunk in data.train_chunks)
    parts.append(f"{steps} DPO steps so far" if data.train_chunks else "no DPO steps yet")
    parts.append("evaluated" if data.eval_metrics is not None else "not evaluated yet")
    return ", ".join(parts) + "; its metrics row and stage times will appear once it finishes"


# ---- figures -------------------------------------------------------------------------------------------------------

def make_plots(run: RunData) -> list[Plot]:
    evaluations = {0: run.initial_eval} if run.initial_eval else {}
    evaluations.update({data.iteration: data.eval_metrics for data in run.iterations if data.eval_metrics})
    pairs = {data.iteration: data.pairs for data in run.iterations if data.pairs}
    chunks = [{"iteration": chunk.iteration, "global_step": chunk.global_step, **chunk.stats}
              for data in run.iterations for chunk in data.train_chunks]
    rollout_tokens = {data.iteration: statistics.fmean(data.response_tokens)
                      for data in run.iterations if data.response_tokens}
    times = {data.iteration: data.metrics for data in run.finished if data.metrics}
    stage_keys = [(key, key.removeprefix("time/").removesuffix("_s")) for key in STAGE_TIMES]
    return [
        Plot("reward_distribution", "Reward distribution per iteration",
             "Every response of the recorded score shards, scored by the run's reward model.",
             reward_distribution({data.iteration: data.scores for data in run.iterations if data.scores}),
             "No score shard recorded yet (an offline DPO run samples nothing)."),
        Plot("chosen_vs_rejected", "Chosen vs rejected reward",
             "The reward-model scores of the pairs DPO trained on (iter_NNN/pairs.jsonl).",
             chosen_vs_rejected({i: [p.chosen_score for p in ps] for i, ps in pairs.items()},
                                {i: [p.rejected_score for p in ps] for i, ps in pairs.items()}),
             "No pairs with scores recorded yet (a preference dataset's pairs may have none)."),
        Plot("dpo_training", "DPO training",
             "Loss, reward accuracy and implicit rewards (beta * log-ratio to the reference) averaged over each "
             "checkpointed chunk of train.save_steps steps; dotted lines separate iterations.",
             dpo_training(chunks), "No training chunk recorded yet."),
        Plot("kl_to_reference", "KL to the reference",
             "kl/ref: E[log pi - log ref] on samples of each iteration's trained policy (temperature 1, top_p 1).",
             kl_to_reference({i: m.get("kl/ref") for i, m in evaluations.items()}),
             "No iteration has been evaluated yet."),
        Plot("response_length", "Response length",
             "Mean tokens per response. Iteration t's rollouts come from the policy before t trains, its "
             "evaluation from the policy after; a rising length with a flat gold score suggests length hacking.",
             response_length(rollout_tokens, {i: m.get("eval/response_tokens_mean") for i, m in evaluations.items()}),
             "No scored responses or evaluations recorded yet."),
        Plot("evaluation", "Gold and evaluation curves",
             "On the held-out evaluation prompts; iteration 0 is pi_0. The gold score is shown when the task has "
             "a gold rule (eval.gold_reward); the win rate is judged by the reward model.",
             evaluation_curves({name: {i: m.get(name) for i, m in evaluations.items()} for name in EVAL_CURVES}),
             "No evaluation recorded yet."),
        Plot("stage_times", "Time per stage",
             "Seconds per finished iteration; 'other' is the rest of time/iteration_s (pairs, export).",
             stage_times(times, stage_keys), "No iteration has finished yet."),
    ]


# Each figure below takes plain numbers keyed by iteration and knows nothing of run directories; iterations with no
# data are simply absent from its input. None: nothing to draw.

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


# ---- the page ------------------------------------------------------------------------------------------------------

def render_page(run: RunData, plots: list[Plot]) -> str:
    title = f"rlhf-loop report: {run.root.name}"
    planned = run.iterations_planned if run.iterations_planned is not None else "?"
    parts = [
        f"<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n<title>{_esc(title)}</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>",
        f"<h1>{_esc(title)}</h1>",
        f"<p class='summary'><code>{_esc(run.root)}</code>: {len(run.finished)} of {planned} iterations finished. "
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by <code>rlhf-loop report</code>.</p>",
    ]
    if run.notes:
        parts.append("<div class='notes'><h2>Notes</h2><ul>"
                     + "".join(f"<li>{_esc(note)}</li>" for note in run.notes) + "</ul></div>")
    parts += [_plots_section(plots), _metrics_section(run), _pairs_section(run), _config_section(run),
              "</body>\n</html>\n"]
    return "\n".join(parts)


def _plots_section(plots: list[Plot]) -> str:
    figures = []
    for plot in plots:
        body = (f"<img src='{plot.name}.png' alt='{_esc(plot.title)}'>" if plot.png is not None
                else f"<p class='missing'>{_esc(plot.missing)}</p>")
        figures.append(f"<figure id='{plot.name}'><h3>{_esc(plot.title)}</h3>{body}"
                       f"<figcaption>{_esc(plot.caption)}</figcaption></figure>")
    return "<h2>Plots</h2>\n<div class='plots'>\n" + "\n".join(figures) + "\n</div>"


def _metrics_section(run: RunData) -> str:
    rows = [data.metrics for data in run.finished if data.metrics]
    if not rows:
        return "<h2>Metrics per iteration</h2>\n<p class='missing'>No iteration has finished yet.</p>"
    keys = sorted({key for row in rows for key in row if key != "iteration"})
    groups = [(group, len(list(members)))
              for group, members in itertools.groupby(keys, key=lambda key: key.split("/", 1)[0] if "/" in key else "")]
    head = ("<tr><th rowspan='2'>iteration</th>"
            + "".join(f"<th colspan='{span}'>{_esc(group)}</th>" for group, span in groups) + "</tr>\n<tr>"
            + "".join(f"<th>{_breakable(key.split('/', 1)[-1])}</th>" for key in keys) + "</tr>")
    body = "\n".join(
        f"<tr><th>{_esc(row.get('iteration', '?'))}</th>"
        + "".join(f"<td>{_esc(_number(row[key])) if key in row else ''}</td>" for key in keys) + "</tr>"
        for row in rows)
    return ("<h2>Metrics per iteration</h2>\n<p>From each finished iteration's <code>metrics.json</code> "
            "(the lines of <code>metrics.jsonl</code>).</p>\n<div class='scroll'><table id='metrics'>\n"
            f"<thead>{head}</thead>\n<tbody>\n{body}\n</tbody>\n</table></div>")


def _pairs_section(run: RunData) -> str:
    parts = ["<h2>Sample pairs</h2>",
             f"<p>Per iteration, the pairs with the largest, the median and the smallest score margin. Texts longer "
             f"than {MAX_TEXT_CHARS} characters are cut.</p>"]
    shown = False
    for data in run.iterations:
        if not data.pairs:
            continue
        shown = True
        parts.append(f"<h3>Iteration {data.iteration} <small>({len(data.pairs)} pairs)</small></h3>")
        parts += [_pair_card(pair, label) for label, pair in sample_pairs(data.pairs)]
    if not shown:
        parts.append("<p class='missing'>No pairs recorded yet.</p>")
    return "\n".join(parts)


def sample_pairs(pairs: list[Pair]) -> list[tuple[str, Pair]]:
    """The pairs with the largest, median and smallest chosen-minus-rejected margin, each once."""
    ranked = sorted(pairs, key=lambda pair: pair.rejected_score - pair.chosen_score)
    picks: dict[int, str] = {}
    for index, label in ((0, "largest margin"), (len(ranked) // 2, "median margin"),
                         (len(ranked) - 1, "smallest margin")):
        picks.setdefault(index, label)
    return [(label, ranked[index]) for index, label in picks.items()]


def _messages(messages: list[dict]) -> str:
    return "".join(f"<div class='message'><span class='role'>{_esc(message.get('role', '?'))}</span>"
                   f"{_esc(_cut(_message_text(message)))}</div>" for message in messages)


def _message_text(message: dict) -> str:
    """The content, then any other key (a parsed turn's tool_calls, a tool turn's name) as JSON on its own line."""
    extras = [f"{key}: {json.dumps(value)}" for key, value in message.items() if key not in ("role", "content")]
    return "\n".join([str(message.get("content", "")), *extras])


def _pair_card(pair: Pair, label: str) -> str:
    prompt = _messages(pair.prompt_messages)
    margin = pair.chosen_score - pair.rejected_score
    return (f"<div class='pair'><div class='pair-head'>prompt {pair.prompt_index} &middot; {_esc(label)}: "
            f"{_esc(_number(margin))}</div><div class='prompt'>{prompt}</div><div class='responses'>"
            f"{_response(pair.chosen, pair.chosen_score, 'chosen')}"
            f"{_response(pair.rejected, pair.rejected_score, 'rejected')}</div></div>")


def _response(response: Response, score: float, kind: str) -> str:
    """A response's head and text; an episode's head says its turns, ending and outcome, and shows every turn."""
    episode = response.episode
    if episode is None:
        about, body = _esc(response.finish_reason), f"<div class='text'>{_esc(_cut(response.text))}</div>"
    else:
        about = (f"{episode.turns} turns, ended {_esc(episode.end)}, outcome "
                 f"{_esc(_number(episode.outcome) if episode.outcome is not None else 'none')}")
        body = f"<div class='text'>{_messages(episode.messages)}</div>"
    return (f"<div class='response {kind}'><div class='response-head'>{kind} &middot; score "
            f"{_esc(_number(score))} &middot; {len(response.token_ids)} tokens, {about}</div>{body}</div>")


def _config_section(run: RunData) -> str:
    if not run.config_text:
        return ""
    return (f"<h2>Config</h2>\n<details><summary>config.yaml (the resolved config the run started with)</summary>"
            f"<pre>{_esc(run.config_text)}</pre></details>")


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _breakable(name: str) -> str:
    """A metric name that may wrap after its underscores, so long names do not widen their columns."""
    return "_<wbr>".join(_esc(part) for part in name.split("_"))


def _cut(text: str) -> str:
    if len(text) <= MAX_TEXT_CHARS:
        return text
    return f"{text[:MAX_TEXT_CHARS]} [... {len(text) - MAX_TEXT_CHARS} more characters]"


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1560px;
       padding: 0 16px; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #d0d7de; }
code { background: #f3f4f6; padding: 1px 4px; border-radius: 4px; }
.notes { background: #fff8e1; border: 1px solid #f0c36d; border-radius: 6px; padding: 4px 16px; }
.notes h2 { border: none; margin-top: 8px; font-size: 1.1em; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(620px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 12px; background: #fff; }
figure h3 { margin: 4px 0 8px; font-size: 1.05em; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #57606a; font-size: 0.9em; margin-top: 6px; }
.missing { color: #57606a; font-style: italic; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 3px 6px; text-align: right; white-space: nowrap; }
thead th { background: #f6f8fa; text-align: center; white-space: normal; min-width: 3em; }
tbody th { background: #f6f8fa; position: sticky; left: 0; }
.pair { border: 1px solid #d0d7de; border-radius: 6px; margin: 10px 0; overflow: hidden; }
.pair-head, .response-head { font-size: 0.85em; color: #57606a; padding: 4px 10px; background: #f6f8fa; }
.prompt { padding: 6px 10px; border-bottom: 1px solid #d0d7de; }
.message, .text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace;
                  font-size: 0.9em; }
.role { font-weight: 600; margin-right: 8px; font-family: system-ui, sans-serif; }
.responses { display: grid; grid-template-columns: 1fr 1fr; }
.response { border-left: 4px solid; } .response .text { padding: 6px 10px; }
.chosen { border-color: #2da44e; } .rejected { border-color: #cf222e; }
details pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 0.85em; }
"""
