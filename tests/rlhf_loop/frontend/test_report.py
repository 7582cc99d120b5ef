"""`rlhf-loop report` on run directories written with the loop's own writers: finished, half-finished, damaged."""

from __future__ import annotations

import html
import json
import random
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rlhf_loop.common import records
from rlhf_loop.frontend import report
from rlhf_loop.driver import stages
from rlhf_loop.frontend.cli import main
from rlhf_loop.config import load_config, to_yaml
from rlhf_loop.driver.metrics import Tracker, pair_metrics, reward_metrics
from rlhf_loop.driver.pairs import select_pairs
from rlhf_loop.common.records import Prompt, Response, Rollout, Scored
from rlhf_loop.frontend.report import read_run, write_report
from rlhf_loop.rundir.manifest import Manifest, RunDir
from rlhf_loop.common.files import atomic_write_jsonl, atomic_write_text

SCRIPT = "<script>alert('pwned')</script>"
PROMPTS, K, SHARD_SIZE, STEPS_PER_CHUNK = 6, 3, 3, 2
PLOTS = ("reward_distribution", "chosen_vs_rejected", "dpo_training", "kl_to_reference", "response_length",
         "evaluation", "stage_times")


class Page(HTMLParser):
    """The parts of the report a test looks at: image sources, and the metrics table's body rows."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[str] = []
        self.metric_rows: list[list[str]] = []
        self._in_metrics = self._in_body = False
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table":
            self._in_metrics = attrs.get("id") == "metrics"
        elif tag == "tbody" and self._in_metrics:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.metric_rows.append([])
        elif tag in ("td", "th") and self._in_body:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.metric_rows[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._in_metrics = self._in_body = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


class Crash(Exception):
    """Stands for the process dying in the middle of a stage."""


def build_run(root: Path, tmp_path: Path, finished: int, partial_shards: int) -> Path:
    """A run of 3 planned iterations: `finished` complete ones, then one stopped after `partial_shards` of its
    score shards (none: the run ends at a finished iteration)."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text("iterations: 3\npolicy:\n  model_path: tiny-policy\nreward:\n  model_path: tiny-rm\n"
                           f"data:\n  prompts: [prompts.jsonl]\nrollout:\n  samples_per_prompt: {K}\n")
    cfg = load_config(config_file)
    run_dir = RunDir.create(root, overwrite=False)
    atomic_write_text(run_dir.config_path, to_yaml(cfg))
    run = stages.Run(cfg, run_dir, Manifest.load(run_dir))
    tracker = Tracker(run_dir, cfg.wandb, {})
    rng = random.Random(0)
    _evaluation(run, None, rng)
    for iteration in range(1, finished + 1):
        scored = _scored(run, iteration, rng, crash_after=None)
        selection = select_pairs(scored, "max_min", 0.0, seed=iteration)
        path = run_dir.iteration(iteration) / "pairs.jsonl"
        atomic_write_jsonl(path, map(records.to_json, selection.pairs))
        run.manifest.record(run.unit(iteration, "pairs"), files=[path], count=len(selection.pairs),
                            dropped=selection.dropped)
        for step in range(STEPS_PER_CHUNK, 2 * STEPS_PER_CHUNK + 1, STEPS_PER_CHUNK):
            loss = 0.69 - 0.1 * iteration - 0.02 * step
            run.manifest.record(run.unit(iteration, f"train/step_{step:06d}"),
                                checkpoint=f"iter_{iteration:03d}/learner/step_{step:06d}", steps=STEPS_PER_CHUNK,
                                seconds=3.0, loss=loss, reward_accuracy=0.5 + 0.1 * step, margin=0.69 - loss,
                                chosen_reward=0.1 * step, rejected_reward=-0.1 * step, learning_rate=4e-4)
        run.manifest.record(run.unit(iteration, "export"), path=f"iter_{iteration:03d}/policy", seconds=0.5)
        run.manifest.record(run.unit(iteration, "sync"), seconds=0.2)
        eval_metrics = _evaluation(run, iteration, rng)
        metrics = {**reward_metrics(scored, selection.pairs), **pair_metrics(selection), **eval_metrics,
                   **{f"dpo/{key}": value for key, value in stages.chunk_means(run, run.unit(iteration, "train/step_"))
                      .items()}}
        tracker.log(iteration, stages.finish_iteration(run, iteration, metrics))
    if partial_shards is not None:
        with pytest.raises(Crash):
            _scored(run, finished + 1, rng, crash_after=partial_shards)
    return root


def _scored(run: stages.Run, iteration: int, rng: random.Random, crash_after: int | None) -> list[Scored]:
    prompts = [Prompt(i, [{"role": "user", "content": f"Name {i % 4 + 1} fruits & <b>vegetables</b>."}],
                      [1, 2, 3 + i]) for i in range(PROMPTS)]
    rollouts = [Rollout(p, [Response(f"answer {iteration}.{p.index}.{k} " * (k + iteration), [5] * (3 * k + iteration),
                                     "stop") for k in range(K)]) for p in prompts]
    if iteration == 1:  # a response that would run as a script if the page did not escape it
        rollouts[0].responses[0] = Response(SCRIPT, [7, 7], "length")
    stages.run_sharded(run, iteration, "rollouts", prompts, SHARD_SIZE,
                       lambda shard: [rollouts[p.index] for p in shard], records.to_json, records.rollout_from_json)
    shards_done = []

    def score(shard: list[Rollout]) -> list[Scored]:
        if crash_after is not None and len(shards_done) == crash_after:
            raise Crash
        shards_done.append(shard)
        scored = [Scored(r, [rng.gauss(0.3 * iteration, 1.0) for _ in r.responses]) for r in shard]
        for item in scored:  # the script scores highest, so it is chosen in the largest-margin pair the page shows
            for index, response in enumerate(item.rollout.responses):
                if response.text == SCRIPT:
                    item.scores[index] = max(item.scores) + 4.0
        return scored

    return stages.run_sharded(run, iteration, "scores", rollouts, SHARD_SIZE, score, records.to_json,
                              records.scored_from_json)


def _evaluation(run: stages.Run, iteration: int | None, rng: random.Random) -> dict[str, float]:
    level = iteration or 0
    rows = [{"prompt_index": i, "response": f"eval {level} {i}", "tokens": 4 + level, "reward": rng.random(),
             "gold": rng.random()} for i in range(4)]
    metrics = {"eval/reward_mean": 0.2 * level, "eval/gold_mean": 0.5 + 0.05 * level,
               "eval/response_tokens_mean": 4.0 + level}
    if iteration is not None:
        metrics.update({"kl/ref": 0.8 * level, "eval/win_rate_vs_initial": 0.5 + 0.1 * level})
    path = (run.run_dir.root / "eval_initial.jsonl" if iteration is None
            else run.run_dir.iteration(iteration) / "eval.jsonl")
    atomic_write_jsonl(path, rows)
    run.manifest.record(stages.EVAL_INITIAL if iteration is None else run.unit(iteration, "eval"), files=[path],
                        metrics=metrics, seconds=1.5)
    return metrics


def check_page(index: Path) -> Page:
    """Every image the page links exists and is a non-empty PNG; returns the parsed page."""
    text = index.read_text(encoding="utf-8")
    page = Page(text)
    for src in page.images:
        png = index.parent / src
        assert png.is_file() and png.stat().st_size > 1000, src
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), src
    return page


def test_report_of_two_finished_iterations_and_a_stopped_third(tmp_path):
    root = build_run(tmp_path / "run", tmp_path, finished=2, partial_shards=1)

    index = write_report(root)

    assert index == root / "report" / "index.html"
    page = check_page(index)
    assert sorted(page.images) == sorted(f"{name}.png" for name in PLOTS)
    assert [row[0] for row in page.metric_rows] == ["1", "2"]
    assert all(len(row) == len(page.metric_rows[0]) > 20 for row in page.metric_rows)
    text = index.read_text(encoding="utf-8")
    assert "<script" not in text
    assert html_escaped(SCRIPT) in text
    assert "&lt;b&gt;vegetables&lt;/b&gt;" in text and "<b>" not in text
    assert "iteration 3 is not finished" in text and "1 of 2 score shards" in text

    third = read_run(root).iterations[2]
    assert (third.finished, third.score_shards, third.score_shards_total) == (False, 1, 2)
    assert len(third.scores) == SHARD_SIZE * K and third.pairs is None


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#x27;")


def test_run_stopped_inside_its_first_iteration(tmp_path):
    root = build_run(tmp_path / "run", tmp_path, finished=0, partial_shards=1)

    page = check_page(write_report(root))

    assert page.metric_rows == []
    assert {"reward_distribution.png", "response_length.png", "evaluation.png"} <= set(page.images)
    text = (root / "report" / "index.html").read_text()
    assert "No iteration has finished yet." in text and "No pairs recorded yet." in text
    assert "iterations 2 to 3 of 3 have not started" in text


def test_run_with_nothing_recorded_yet(tmp_path):
    root = build_run(tmp_path / "run", tmp_path, finished=0, partial_shards=0)

    page = check_page(write_report(root))

    assert page.images == ["response_length.png", "evaluation.png"]  # pi_0's evaluation is all there is


def test_unreadable_files_are_noted_not_fatal(tmp_path):
    root = build_run(tmp_path / "run", tmp_path, finished=2, partial_shards=None)
    (root / "iter_001" / "pairs.jsonl").unlink()
    (root / "iter_002" / "scores" / "shard_00001.jsonl").write_text('{"rollout": ')
    (root / "iter_002" / "metrics.json").write_text("")

    page = check_page(write_report(root))

    text = (root / "report" / "index.html").read_text()
    assert "iter_001/pairs: its file could not be read" in text
    assert "iter_002/scores/shard_00001: its file could not be read" in text
    assert "iter_002/metrics.json could not be read" in text
    assert [row[0] for row in page.metric_rows] == ["1"]


def test_rerun_replaces_the_report_and_leaves_no_temporary_directory(tmp_path):
    root = build_run(tmp_path / "run", tmp_path, finished=1, partial_shards=None)
    write_report(root)
    (root / "report" / "stale.png").write_bytes(b"old")

    write_report(root)

    assert not (root / "report" / "stale.png").exists()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    check_page(root / "report" / "index.html")


def test_cli(tmp_path, capsys):
    root = build_run(tmp_path / "run", tmp_path, finished=1, partial_shards=None)

    assert main(["report", str(root)]) == 0
    assert f"report written to {root / 'report' / 'index.html'}" in capsys.readouterr().err

    (tmp_path / "not_a_run").mkdir()
    assert main(["report", str(tmp_path / "not_a_run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhf-loop: error: ") and "\n" not in err and "is not a run directory" in err


def test_plots_skip_unscored_pairs_and_empty_inputs():
    nan = float("nan")
    assert report.chosen_vs_rejected({1: [nan, nan]}, {1: [nan, nan]}) is None  # offline pairs without scores
    assert report.chosen_vs_rejected({1: [nan, 1.0], 2: [nan]}, {1: [0.5, nan], 2: [nan]}).startswith(b"\x89PNG")
    assert report.reward_distribution({}) is None
    assert report.kl_to_reference({1: nan, 2: None}) is None
    assert report.stage_times({}, [("time/train_s", "train")]) is None


def test_iterations_shards_and_steps_are_read_in_order_past_their_padding(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    atomic_write_text(run_dir.config_path, "iterations: 1001\n")
    manifest = Manifest.load(run_dir)
    for index, score in ((100000, 2.0), (99999, 1.0)):  # shard names padded to 5 digits
        rollout = Rollout(Prompt(index, [{"role": "user", "content": "q"}], [1]), [Response("a", [5], "stop")])
        path = run_dir.iteration(999) / "scores" / f"shard_{index:05d}.jsonl"
        atomic_write_jsonl(path, [records.to_json(Scored(rollout, [score]))])
        manifest.record(f"iter_999/scores/shard_{index:05d}", files=[path], of_shards=2)
    for unit in ("iter_1000/train/step_000002", "iter_999/train/step_1000000", "iter_999/train/step_999999"):
        manifest.record(unit, steps=1, loss=0.5)
    data = read_run(run_dir.root)
    assert [i.iteration for i in data.iterations] == [999, 1000]
    assert data.iterations[0].scores == [1.0, 2.0]
    assert [(c.iteration, c.global_step) for i in data.iterations for c in i.train_chunks] == [
        (999, 999999), (999, 1000000), (1000, 1000002)]


def test_a_pair_of_episodes_shows_every_turn_with_its_ending_and_outcome():
    episode = records.Episode([{"role": "assistant", "content": "dog"}, {"role": "user", "content": "Again <please>."},
                               {"role": "assistant", "content": "apple"}], [1, 0, 1], 2, "done", 0.9)
    chosen = Response("apple", [1, 2, 3], "stop", episode)
    rejected = Response("dog", [4], "length", records.Episode([{"role": "assistant", "content": "dog"}], [1], 1,
                                                              "max_turns", None))
    card = report._pair_card(records.Pair(0, [{"role": "user", "content": "Say apple."}], [9], chosen, rejected, 0.9,
                                          0.0), "largest margin")
    assert "2 turns, ended done, outcome 0.9" in card and "1 turns, ended max_turns, outcome none" in card
    assert card.count("<span class='role'>assistant</span>") == 3 and "Again &lt;please&gt;." in card


def test_an_episodes_tool_calls_and_tool_turns_show_their_keys():
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"a": 2, "b": 3}}}
    turns = [{"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "name": "calculator", "content": "5"}, {"role": "assistant", "content": "It is 5."}]
    episode = records.Episode(turns, [1, 0, 1], 2, "done", 1.0)
    pair = records.pair_from_json(json.loads(json.dumps(records.to_json(records.Pair(
        0, [{"role": "user", "content": "2 + 3?"}], [9], Response("It is 5.", [1, 2, 3], "stop", episode),
        Response("It is 5.", [1, 2, 3], "stop", episode), 1.0, 0.0)))))  # as the run directory holds it
    assert pair.chosen.episode.messages == turns
    card = report._pair_card(pair, "largest margin")
    assert html.escape(f"tool_calls: {json.dumps([call])}") in card and html.escape('name: "calculator"') in card
