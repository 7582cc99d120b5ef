"""`rlhf-loop status` on hand-made run directories: the stage of every unit of an online and an offline run, and
runs that stopped without saying so."""

import json
import os
import subprocess
import sys
import time

import pytest

from rlhf_loop.heartbeat import write_heartbeat
from rlhf_loop.rundir import Manifest, RunDir, atomic_write_json, atomic_write_text
from rlhf_loop.status import STALE_AFTER_S, describe, run_status

MODELS = "policy: {model_path: p}\nreward: {model_path: r}\n"
ONLINE = MODELS + """iterations: 2
data: {prompts: [prompts.jsonl]}
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
