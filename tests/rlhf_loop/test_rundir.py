import json
import os
import subprocess
import sys

import pytest

from rlhf_loop.errors import UserError
from rlhf_loop.rundir import KILL_AT_ENV, Manifest, RunDir, atomic_write_jsonl, atomic_write_text, read_jsonl


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "rows.jsonl"
    atomic_write_jsonl(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("crash while producing rows")

    with pytest.raises(RuntimeError):
        atomic_write_jsonl(path, rows())
    assert read_jsonl(path) == [{"a": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_manifest_records_files_and_survives_reload(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    manifest = Manifest.load(run_dir)
    shard = run_dir.iteration(1) / "rollouts" / "shard_00000.jsonl"
    atomic_write_jsonl(shard, [{"x": 1}])
    manifest.record("iter_001/rollouts/shard_00000", files=[shard], items=1)
    reloaded = Manifest.load(run_dir)
    assert reloaded.done("iter_001/rollouts/shard_00000") and not reloaded.done("iter_001/pairs")
    assert reloaded.verified_file("iter_001/rollouts/shard_00000") == shard
    assert reloaded.info("iter_001/rollouts/shard_00000")["items"] == 1


def test_tampered_file_is_detected(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    manifest = Manifest.load(run_dir)
    path = run_dir.root / "pairs.jsonl"
    atomic_write_jsonl(path, [{"x": 1}])
    manifest.record("iter_001/pairs", files=[path])
    path.write_text('{"x": 2}\n')
    with pytest.raises(UserError, match="differs from what manifest.json recorded"):
        manifest.verified_file("iter_001/pairs")


def test_create_refuses_existing_run_unless_overwrite(tmp_path):
    root = tmp_path / "run"
    RunDir.create(root, overwrite=False)
    (root / "keep.txt").write_text("finished work")
    with pytest.raises(UserError, match="already exists"):
        RunDir.create(root, overwrite=False)
    assert (root / "keep.txt").read_text() == "finished work"
    RunDir.create(root, overwrite=True)
    assert not (root / "keep.txt").exists()


def test_existing_rejects_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="is not a run directory"):
        RunDir.existing(tmp_path)


@pytest.mark.parametrize("point, recorded", [("iter_001/pairs", True), ("iter_001/pairs:before", False)])
def test_kill_hook_stops_the_process_around_the_manifest_write(tmp_path, point, recorded):
    script = (
        "import sys; from pathlib import Path; from rlhf_loop.rundir import Manifest, RunDir, atomic_write_text\n"
        f"run_dir = RunDir(Path({str(tmp_path)!r}))\n"
        "m = Manifest.load(run_dir)\n"
        "atomic_write_text(run_dir.root / 'pairs.jsonl', 'x')\n"
        "m.record('iter_001/pairs', files=[run_dir.root / 'pairs.jsonl'])\n"
        "print('survived')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, KILL_AT_ENV: point},
                            capture_output=True, text=True)
    assert result.returncode == -9 and "survived" not in result.stdout
    units = json.loads((tmp_path / "manifest.json").read_text())["units"]
    assert ("iter_001/pairs" in units) is recorded
