"""`rlhf-loop report RUN_DIR`: one HTML page with PNG plots of a run, written to RUN_DIR/report/.

The page has the reward distribution, chosen vs rejected rewards, DPO training curves, KL to the reference,
response lengths, evaluation curves and stage times, a metrics table with a row per finished iteration, and a few
sample pairs per iteration. Every text that comes from the run is HTML-escaped: responses are model output.
The report is built in a temporary directory inside the run directory and renamed into place, so a reader never
sees a half-written one; running the command again replaces it.
"""

from __future__ import annotations

import html
import itertools
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_loop.frontend import report_plots
from rlhf_loop.common.records import Pair, Response
from rlhf_loop.frontend.report_data import RunData, read_run
from rlhf_loop.common.files import atomic_directory, atomic_write_bytes, atomic_write_text
from rlhf_loop.driver.stages import STAGE_TIMES

REPORT_DIR = "report"
MAX_TEXT_CHARS = 2000  # longer prompts and responses are cut, so a run of long answers keeps a readable page
EVAL_CURVES = ("eval/gold_mean", "eval/reward_mean", "eval/win_rate_vs_initial")


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
             report_plots.reward_distribution({data.iteration: data.scores for data in run.iterations if data.scores}),
             "No score shard recorded yet (an offline DPO run samples nothing)."),
        Plot("chosen_vs_rejected", "Chosen vs rejected reward",
             "The reward-model scores of the pairs DPO trained on (iter_NNN/pairs.jsonl).",
             report_plots.chosen_vs_rejected({i: [p.chosen_score for p in ps] for i, ps in pairs.items()},
                                             {i: [p.rejected_score for p in ps] for i, ps in pairs.items()}),
             "No pairs with scores recorded yet (a preference dataset's pairs may have none)."),
        Plot("dpo_training", "DPO training",
             "Loss, reward accuracy and implicit rewards (beta * log-ratio to the reference) averaged over each "
             "checkpointed chunk of train.save_steps steps; dotted lines separate iterations.",
             report_plots.dpo_training(chunks), "No training chunk recorded yet."),
        Plot("kl_to_reference", "KL to the reference",
             "kl/ref: E[log pi - log ref] on the evaluation samples of each iteration's trained policy.",
             report_plots.kl_to_reference({i: m.get("kl/ref") for i, m in evaluations.items()}),
             "No iteration has been evaluated yet."),
        Plot("response_length", "Response length",
             "Mean tokens per response. Iteration t's rollouts come from the policy before t trains, its "
             "evaluation from the policy after; a rising length with a flat gold score suggests length hacking.",
             report_plots.response_length(rollout_tokens,
                                          {i: m.get("eval/response_tokens_mean") for i, m in evaluations.items()}),
             "No scored responses or evaluations recorded yet."),
        Plot("evaluation", "Gold and evaluation curves",
             "On the held-out evaluation prompts; iteration 0 is pi_0. The gold score is shown when the task has "
             "a gold rule (eval.gold_reward); the win rate is judged by the reward model.",
             report_plots.evaluation_curves({name: {i: m.get(name) for i, m in evaluations.items()}
                                             for name in EVAL_CURVES}),
             "No evaluation recorded yet."),
        Plot("stage_times", "Time per stage",
             "Seconds per finished iteration; 'other' is the rest of time/iteration_s (pairs, export).",
             report_plots.stage_times(times, stage_keys), "No iteration has finished yet."),
    ]


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


def _pair_card(pair: Pair, label: str) -> str:
    prompt = "".join(f"<div class='message'><span class='role'>{_esc(message.get('role', '?'))}</span>"
                     f"{_esc(_cut(str(message.get('content', ''))))}</div>" for message in pair.prompt_messages)
    margin = pair.chosen_score - pair.rejected_score
    return (f"<div class='pair'><div class='pair-head'>prompt {pair.prompt_index} &middot; {_esc(label)}: "
            f"{_esc(_number(margin))}</div><div class='prompt'>{prompt}</div><div class='responses'>"
            f"{_response(pair.chosen, pair.chosen_score, 'chosen')}"
            f"{_response(pair.rejected, pair.rejected_score, 'rejected')}</div></div>")


def _response(response: Response, score: float, kind: str) -> str:
    return (f"<div class='response {kind}'><div class='response-head'>{kind} &middot; score "
            f"{_esc(_number(score))} &middot; {len(response.token_ids)} tokens, {_esc(response.finish_reason)}</div>"
            f"<div class='text'>{_esc(_cut(response.text))}</div></div>")


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
