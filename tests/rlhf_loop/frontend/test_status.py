"""`rlhf-loop status` on hand-made run directories: the stage of every unit of an online and an offline run, and
runs that stopped without saying so."""

import io
import json
import os
import subprocess
import sys
import time

import pytest

from rlhf_loop.rundir.heartbeat import write_heartbeat
from rlhf_loop.rundir.manifest import Manifest, RunDir
from rlhf_loop.common.files import atomic_write_json, atomic_write_text
from rlhf_loop.frontend.status import CLEAR, STALE_AFTER_S, describe, run_status, watch

MODELS = "policy: {model_path: p}\nreward: {model_path: r}\n"
ONLINE = MODELS + """iterations: 2
data: {prompts: [prompts.jsonl]}
eval: {prompts: eval.jsonl}
sft: {enabled: true, dataset: sft.jsonl}
pairs: {export_format: parquet}
"""
OFFLINE = MODELS + "iterations: 1\npairs: {dataset: pairs.jsonl}\n"
NO_TRAINING = MODELS + "iterations: 1\ndata: {prompts: [prompts.jsonl]}\ntrain: {enabled: false}\n"

# (unit the run records next, (iteration, stage) status reports once it is recorded), in the order a run does them
ONLINE_UNITS = [
    ("sft/step_000002", (None, "sft")), ("sft/step_000004", (None, "sft")), ("sft/done", (None, "eval_initial")),
    ("eval_initial", (1, "rollouts")),
    ("iter_001/rollouts/shard_00000", (1, "rollouts")), ("iter_001/rollouts/shard_00001", (1, "scores")),
    ("iter_001/scores/shard_00000", (1, "scores")), ("iter_001/scores/shard_00001", (1, "pairs")),
    ("iter_001/pairs", (1, "pairs_dataset")), ("iter_001/pairs_dataset", (1, "train")),
    ("iter_001/train/step_000002", (1, "train")), ("iter_001/train/step_000004", (1, "train")),
    ("iter_001/export", (1, "sync")), ("iter_001/sync", (1, "eval")), ("iter_001/eval", (1, "done")),
    ("iter_001/done", (2, "rollouts")),
    ("iter_002/rollouts/shard_00000", (2, "rollouts")), ("iter_002/rollouts/shard_00001", (2, "scores")),
    ("iter_002/scores/shard_00000", (2, "scores")), ("iter_002/scores/shard_00001", (2, "pairs")),
    ("iter_002/pairs", (2, "pairs_dataset")), ("iter_002/pairs_dataset", (2, "train")),
    ("iter_002/train/step_000002", (2, "train")), ("iter_002/export", (2, "sync")), ("iter_002/sync", (2, "eval")),
    ("iter_002/eval", (2, "done")), ("iter_002/done", None),
]
OFFLINE_UNITS = [("iter_001/pairs", (1, "train")), ("iter_001/train/step_000003", (1, "train")),
                 ("iter_001/export", (1, "done")), ("iter_001/done", None)]
NO_TRAINING_UNITS = [("iter_001/rollouts/shard_00000", (1, "rollouts")),
                     ("iter_001/rollouts/shard_00001", (1, "scores")), ("iter_001/scores/shard_00000", (1, "scores")),
                     ("iter_001/scores/shard_00001", (1, "pairs")), ("iter_001/pairs", (1, "done")),
                     ("iter_001/done", None)]


def a_run(tmp_path, config):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    atomic_write_text(run_dir.config_path, config)
    return run_dir


def record(manifest, unit):
    shards = {"of_shards": 2} if "/shard_" in unit else {}
    manifest.record(unit, steps=2, **shards)


@pytest.mark.parametrize("config, units, first", [
    (ONLINE, ONLINE_UNITS, (None, "sft")), (OFFLINE, OFFLINE_UNITS, (1, "pairs")),
    (NO_TRAINING, NO_TRAINING_UNITS, (1, "rollouts")),
], ids=["online", "offline", "no_training"])
def test_every_stage_of_a_run_is_reported_as_it_finishes(tmp_path, config, units, first):
    run_dir = a_run(tmp_path, config)
    manifest = Manifest.load(run_dir)
    status = run_status(str(run_dir.root))
    assert (status["current"]["iteration"], status["current"]["stage"]) == first
    for unit, expected in units:
        record(manifest, unit)
        status = run_status(str(run_dir.root))
        describe(status)  # renders every stage of every run shape
        if expected is None:
            assert status["finished"] and "current" not in status, unit
        else:
            assert not status["finished"]
            assert (status["current"]["iteration"], status["current"]["stage"]) == expected, unit


def test_progress_within_sharded_and_chunked_stages(tmp_path):
    run_dir = a_run(tmp_path, ONLINE)
    manifest = Manifest.load(run_dir)
    for unit, _ in ONLINE_UNITS[:ONLINE_UNITS.index(("iter_001/train/step_000004", (1, "train")))]:
        record(manifest, unit)
    status = run_status(str(run_dir.root))
    progress = status["current"]["progress"]
    assert list(progress) == ["rollouts", "scores", "pairs", "pairs_dataset", "train", "export", "sync", "eval",
                              "done"]
    assert progress["train"] == {"done": False, "steps_done": 2}
    assert progress["rollouts"] == {"done": True, "shards_done": 2, "shards": 2}
    assert status["sft_done"] is True and status["iterations_done"] == 0
    assert "iteration 1: at stage 'train'" in describe(status) and "steps done 2" in describe(status)


def test_offline_and_untrained_runs_list_only_their_stages(tmp_path):
    offline = run_status(str(a_run(tmp_path / "offline", OFFLINE).root))
    assert list(offline["current"]["progress"]) == ["pairs", "train", "export", "done"]
    assert offline["sft_done"] is None
    untrained = run_status(str(a_run(tmp_path / "untrained", NO_TRAINING).root))
    assert list(untrained["current"]["progress"]) == ["rollouts", "scores", "pairs", "done"]


# ---- the heartbeat ---------------------------------------------------------------------------------------------------

def a_gone_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def beat(run_dir, **changes):
    write_heartbeat(run_dir, "iter_001/train")
    atomic_write_json(run_dir.heartbeat_path, {**json.loads(run_dir.heartbeat_path.read_text()), **changes})


def test_a_live_run_is_not_flagged(tmp_path):
    run_dir = a_run(tmp_path, NO_TRAINING)
    beat(run_dir)
    status = run_status(str(run_dir.root))
    assert status["stopped_unannounced"] is None
    assert status["heartbeat"]["pid"] == os.getpid() and status["heartbeat"]["stage"] == "iter_001/train"
    assert status["heartbeat"]["age_s"] < 60
    assert "heartbeat 0 s ago" in describe(status) and "STOPPED" not in describe(status)


@pytest.mark.parametrize("changes, reason", [
    (lambda: {"pid": a_gone_pid()}, "is gone"),
    (lambda: {"time": time.time() - STALE_AFTER_S - 60, "host": "another-host"}, "no heartbeat for"),
])
def test_a_run_that_stopped_without_saying_so_is_flagged(tmp_path, changes, reason):
    run_dir = a_run(tmp_path, NO_TRAINING)
    beat(run_dir, **changes())
    status = run_status(str(run_dir.root))
    assert reason in status["stopped_unannounced"]
    assert f"STOPPED without saying so ({status['stopped_unannounced']}); `rlhf-loop resume" in describe(status)


def test_a_run_that_said_how_it_ended_or_finished_is_not_flagged(tmp_path):
    run_dir = a_run(tmp_path, NO_TRAINING)
    beat(run_dir, pid=a_gone_pid(), ended="failed: RuntimeError: out of memory")
    status = run_status(str(run_dir.root))
    assert status["stopped_unannounced"] is None
    assert "the process ended: failed: RuntimeError: out of memory" in describe(status)
    manifest = Manifest.load(run_dir)
    for unit, _ in NO_TRAINING_UNITS:
        record(manifest, unit)
    beat(run_dir, pid=a_gone_pid(), ended=None)
    assert run_status(str(run_dir.root))["stopped_unannounced"] is None


# ---- --watch -----------------------------------------------------------------------------------------------------------

class Screen(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def finish_iteration(manifest, run_dir, iteration, seconds):
    """A finished online iteration without training, as the loop leaves it: units, metrics.json, metrics.jsonl."""
    prefix = f"iter_{iteration:03d}/"
    for unit in ("rollouts/shard_00000", "rollouts/shard_00001", "scores/shard_00000", "scores/shard_00001"):
        manifest.record(prefix + unit, of_shards=2, seconds=seconds / 4)
    manifest.record(prefix + "pairs")
    metrics = {"iteration": iteration, "reward/mean": 0.1 * iteration, "time/iteration_s": seconds}
    atomic_write_json(run_dir.iteration(iteration) / "metrics.json", metrics)
    manifest.record(prefix + "done")
    lines = [json.loads(p.read_text()) for p in sorted(run_dir.root.glob("iter_*/metrics.json"))]
    atomic_write_text(run_dir.metrics_path, "".join(json.dumps(line) + "\n" for line in lines))


def test_watch_redraws_a_running_run_in_place_until_it_finishes(tmp_path):
    run_dir = a_run(tmp_path, NO_TRAINING.replace("iterations: 1", "iterations: 3"))
    manifest = Manifest.load(run_dir)
    beat(run_dir)
    finish_iteration(manifest, run_dir, 1, seconds=600.0)
    manifest.record("iter_002/rollouts/shard_00000", of_shards=2, seconds=120.0)
    progress = iter([lambda: manifest.record("iter_002/rollouts/shard_00001", of_shards=2, seconds=120.0),
                     lambda: (finish_iteration(manifest, run_dir, 2, 600.0), finish_iteration(manifest, run_dir, 3,
                                                                                               600.0))])
    sleeps = []
    screen = Screen(tty=True)
    watch(str(run_dir.root), 2.5, out=screen, sleep=lambda s: (sleeps.append(s), next(progress)()))
    frames = screen.getvalue().split(CLEAR)[1:]
    assert len(frames) == 3 and sleeps == [2.5, 2.5]  # it stopped by itself once the run finished
    assert "1/3 iterations done" in frames[0] and "rollouts      shards done 1, shards 2" in frames[0]
    assert "about 18 min left (10 min an iteration so far)" in frames[0]  # 2 x 600 s less 120 s spent
    assert "rollouts      done" in frames[1] and "about 16 min left" in frames[1]
    assert "heartbeat 0 s ago" in frames[0] and "every 2.5 s; Ctrl-C stops watching" in frames[0]
    assert "3/3 iterations done" in frames[2] and "left" not in frames[2] and "finished]" in frames[2]
    assert "last metrics (iteration 3): reward/mean=0.3" in frames[2]


def test_watch_elsewhere_than_a_terminal_prints_frames_one_after_another(tmp_path):
    run_dir = a_run(tmp_path, NO_TRAINING)
    screen = Screen(tty=False)
    watch(str(run_dir.root), 1.0, out=screen, frames=2, sleep=lambda s: None)
    text = screen.getvalue()
    assert CLEAR not in text and text.count("0/1 iterations done") == 2


def test_ctrl_c_stops_watching_cleanly_and_nothing_is_started(tmp_path):
    run_dir = a_run(tmp_path, NO_TRAINING)
    before = sorted(path.name for path in run_dir.root.iterdir())

    def interrupted(seconds):
        raise KeyboardInterrupt

    screen = Screen(tty=True)
    watch(str(run_dir.root), 1.0, out=screen, sleep=interrupted)  # returns instead of raising
    assert screen.getvalue().endswith("\n") and "0/1 iterations done" in screen.getvalue()
    assert sorted(path.name for path in run_dir.root.iterdir()) == before  # read only: no heartbeat, no logs


def test_without_held_out_prompts_there_is_no_evaluation_stage(tmp_path):
    run_dir = a_run(tmp_path, ONLINE.replace("eval: {prompts: eval.jsonl}\n", "").replace(
        "sft: {enabled: true, dataset: sft.jsonl}\n", ""))
    status = run_status(str(run_dir.root))
    assert list(status["current"]["progress"]) == ["rollouts", "scores", "pairs", "pairs_dataset", "train", "export",
                                                   "sync", "done"]
