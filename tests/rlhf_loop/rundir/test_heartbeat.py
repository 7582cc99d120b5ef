import json
import os
import time

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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heartbeat.json"]  # written atomically


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
