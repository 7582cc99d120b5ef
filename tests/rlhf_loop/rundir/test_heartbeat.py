import json
import os
import threading
import time
from pathlib import Path

import pytest

from rlhf_loop.rundir.heartbeat import beating, read_heartbeat, write_heartbeat
from rlhf_loop.rundir.manifest import RunDir


def test_a_stage_is_kept_with_the_time_it_began(tmp_path):
    run_dir = RunDir(tmp_path)
    write_heartbeat(run_dir, "iter_001/rollouts")
    first = read_heartbeat(run_dir)
    assert first["pid"] == os.getpid() and first["stage"] == "iter_001/rollouts" and first["ended"] is None
    time.sleep(0.01)
    write_heartbeat(run_dir, "iter_001/rollouts")
    again = read_heartbeat(run_dir)
    assert again["time"] > first["time"] and again["stage_since"] == first["stage_since"]
    write_heartbeat(run_dir, "iter_001/scores")
    assert read_heartbeat(run_dir)["stage_since"] > first["stage_since"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heartbeat.json"]  # no temp file left behind


def test_the_heartbeat_is_written_atomically(tmp_path, monkeypatch):
    """Every write goes to a temp file beside heartbeat.json, complete and on disk, then renamed onto it: at each
    rename the file a reader sees is the old heartbeat, whole, and the one coming in is whole too."""
    run_dir = RunDir(tmp_path)
    renames = []
    real_replace = os.replace

    def observed_replace(source, destination):
        seen = json.loads(Path(destination).read_text()) if Path(destination).exists() else None
        renames.append((Path(source), Path(destination), json.loads(Path(source).read_text()), seen))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", observed_replace)
    for stage in ("iter_001/rollouts", "iter_001/scores", "iter_001/pairs"):
        write_heartbeat(run_dir, stage)
    assert [(source.parent, destination) for source, destination, _, _ in renames] == [
        (tmp_path, run_dir.heartbeat_path)] * 3
    assert all(source.name != "heartbeat.json" for source, _, _, _ in renames)
    assert [incoming["stage"] for _, _, incoming, _ in renames] == ["iter_001/rollouts", "iter_001/scores",
                                                                   "iter_001/pairs"]
    assert [seen and seen["stage"] for _, _, _, seen in renames] == [None, "iter_001/rollouts", "iter_001/scores"]


def test_a_reader_never_sees_a_partial_heartbeat(tmp_path):
    """The background beat and the stages rewrite the file while `rlhf-loop status` reads it: every read parses."""
    run_dir = RunDir(tmp_path)
    write_heartbeat(run_dir, "start")
    stop, reads, broken = threading.Event(), [], []

    def read() -> None:
        while not stop.is_set():
            text = run_dir.heartbeat_path.read_text()
            try:
                reads.append(json.loads(text)["stage"])
            except ValueError:
                broken.append(text)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for index in range(150):
            write_heartbeat(run_dir, f"iter_001/rollouts/shard_{index:05d}")
    finally:
        stop.set()
        reader.join()
    assert broken == [] and len(reads) > 0


def test_beating_keeps_the_heartbeat_fresh_and_records_a_finish(tmp_path):
    run_dir = RunDir(tmp_path)
    with beating(run_dir, interval_s=0.02):
        write_heartbeat(run_dir, "iter_001/train")
        since = read_heartbeat(run_dir)["time"]
        deadline = time.monotonic() + 5
        while read_heartbeat(run_dir)["time"] == since and time.monotonic() < deadline:
            time.sleep(0.01)
        fresh = read_heartbeat(run_dir)
        assert fresh["time"] > since and fresh["stage"] == "iter_001/train"  # the beat keeps the stage
    assert read_heartbeat(run_dir)["ended"] == "finished"


def test_beating_records_the_error_a_run_ended_with(tmp_path):
    run_dir = RunDir(tmp_path)
    with pytest.raises(RuntimeError), beating(run_dir, interval_s=10):
        write_heartbeat(run_dir, "iter_002/eval")
        raise RuntimeError("CUDA out of memory\nmore lines")
    beat = json.loads((tmp_path / "heartbeat.json").read_text())
    assert beat["ended"] == "failed: RuntimeError: CUDA out of memory" and beat["stage"] == "iter_002/eval"
