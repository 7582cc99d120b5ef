import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_loop.common.errors import UserError
from rlhf_loop.common.faults import KILL_AT_ENV
from rlhf_loop.rundir.manifest import Manifest, RunDir, iteration_of, unit_order
from rlhf_loop.common.files import atomic_write_bytes, atomic_write_jsonl, atomic_write_text, read_jsonl


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


def test_units_recorded_from_several_threads_are_all_kept_while_another_reads(tmp_path):
    """Streaming stages record from their own threads: no record is lost, and a reader iterating the units never
    sees them change under it."""
    import threading

    manifest = Manifest.load(RunDir.create(tmp_path / "run", overwrite=False))
    writers = [threading.Thread(target=lambda t=t: [manifest.record(f"iter_001/s{t}/shard_{i:05d}") for i in range(40)])
               for t in range(3)]
    for writer in writers:
        writer.start()
    while any(writer.is_alive() for writer in writers):
        sorted(unit for unit in manifest.units if "shard" in unit)  # raises if the dict changed while iterated
    for writer in writers:
        writer.join()
    assert len(Manifest.load(RunDir(tmp_path / "run")).units) == 120


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
    run_dir = RunDir.create(root, overwrite=False)
    atomic_write_text(run_dir.config_path, "iterations: 1\n")
    atomic_write_text(root / "iter_001" / "pairs.jsonl", "finished work")
    with pytest.raises(UserError, match="already exists"):
        RunDir.create(root, overwrite=False)
    assert (root / "iter_001" / "pairs.jsonl").read_text() == "finished work"
    RunDir.create(root, overwrite=True)
    assert not (root / "iter_001").exists()


def test_existing_rejects_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="is not a run directory"):
        RunDir.existing(tmp_path)


@pytest.mark.parametrize("point, recorded", [("iter_001/pairs", True), ("iter_001/pairs:before", False)])
def test_kill_hook_stops_the_process_around_the_manifest_write(tmp_path, point, recorded):
    script = (
        "import sys; from pathlib import Path; from rlhf_loop.rundir.manifest import Manifest, RunDir; from rlhf_loop.common.files import atomic_write_text\n"
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


# ---- --overwrite deletes a run directory and nothing else ------------------------------------------------------------

def a_run(root):
    """A run directory as `rlhf-loop run` leaves it: manifest, frozen config, a finished shard, wandb files."""
    run_dir = RunDir.create(root, overwrite=False)
    atomic_write_text(run_dir.config_path, "iterations: 1\n")
    shard = run_dir.iteration(1) / "rollouts" / "shard_00000.jsonl"
    atomic_write_jsonl(shard, [{"x": 1}])
    Manifest.load(run_dir).record("iter_001/rollouts/shard_00000", files=[shard], items=1)
    (run_dir.root / "wandb").mkdir()
    return run_dir


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def someones_files(root):
    (root / "thesis").mkdir(parents=True)
    (root / "thesis" / "chapter1.tex").write_text("years of work")
    (root / ".bashrc").write_text("alias ll='ls -l'")


def our_files_plus_notes(root):
    a_run(root)
    (root / "NOTES.md").write_text("what I tried")


def looks_like_a_run_but_is_not_ours(root):
    root.mkdir()
    (root / "manifest.json").write_text('{"files": ["not ours"]}')
    (root / "config.yaml").write_text("model: someone else's\n")


def only_a_manifest(root):
    root.mkdir()
    atomic_write_text(root / "manifest.json", json.dumps({"version": 1, "units": {}}))


@pytest.mark.parametrize("make, reason", [
    (someones_files, "which no run writes"),
    (our_files_plus_notes, "it holds 'NOTES.md'"),
    (looks_like_a_run_but_is_not_ours, "no manifest.json in the format rlhf-loop writes"),
    (only_a_manifest, "no config.yaml"),
])
def test_overwrite_refuses_a_directory_that_is_not_only_a_run_and_deletes_nothing(tmp_path, make, reason):
    root = tmp_path / "dir"
    make(root)
    before = snapshot(root)
    with pytest.raises(UserError, match="is not a run directory") as refused:
        RunDir.create(root, overwrite=True)
    assert reason in str(refused.value) and "\n" not in str(refused.value)
    assert snapshot(root) == before


def test_overwrite_refuses_a_file_and_a_symlink(tmp_path):
    file = tmp_path / "results.csv"
    file.write_text("a,b\n")
    with pytest.raises(UserError, match="is a file, not a directory"):
        RunDir.create(file, overwrite=True)
    assert file.read_text() == "a,b\n"
    run_dir = a_run(tmp_path / "run")
    link = tmp_path / "link"
    link.symlink_to(run_dir.root)
    with pytest.raises(UserError, match="symbolic link"):
        RunDir.create(link, overwrite=True)
    assert (run_dir.root / "iter_001" / "rollouts" / "shard_00000.jsonl").is_file()


def test_overwrite_replaces_a_real_run_with_a_fresh_one(tmp_path, capsys):
    old = a_run(tmp_path / "run")
    old_id = Manifest.load(old).run_id
    new = RunDir.create(old.root, overwrite=True)
    assert "deleted the previous run" in capsys.readouterr().err
    assert sorted(p.name for p in new.root.iterdir()) == ["manifest.json"]
    fresh = Manifest.load(new)
    assert fresh.units == {} and fresh.run_id and fresh.run_id != old_id


def test_overwrite_through_the_cli_keeps_someones_files(tmp_path, capsys, monkeypatch, cli_without_ray):
    from rlhf_loop import loop
    from rlhf_loop.frontend import cli
    from rlhf_loop.frontend import preflight

    started = []
    monkeypatch.setattr(preflight, "preflight", lambda cfg: None)  # no models are needed to decide about the directory
    monkeypatch.setattr(loop, "run", lambda cfg, run_dir, early_actors=None: started.append(run_dir))
    config = tmp_path / "run.yaml"
    config.write_text("policy: {model_path: p}\nreward: {model_path: r}\ndata: {prompts: [hub/prompts]}\n")
    home = tmp_path / "home"
    someones_files(home)
    before = snapshot(home)
    assert cli.main(["run", str(config), "--run-dir", str(home), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhf-loop: error: ") and "\n" not in err and "not a run directory" in err
    assert snapshot(home) == before and not started

    run_dir = a_run(tmp_path / "run")
    assert cli.main(["run", str(config), "--run-dir", str(run_dir.root), "--overwrite"]) == 0
    assert started and not (run_dir.root / "iter_001").exists()
    assert Manifest.load(run_dir).units == {}


# ---- the manifest's previous generation, and its version ---------------------------------------------------------

def recorded(run_dir, *units):
    manifest = Manifest.load(run_dir)
    for unit in units:
        manifest.record(unit)
    return manifest


@pytest.mark.parametrize("keep", [0, 1, 0.5, 0.99])
def test_a_damaged_manifest_recovers_all_but_its_last_record(tmp_path, capsys, keep):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    recorded(run_dir, "iter_001/pairs", "iter_001/export", "iter_001/done")
    raw = run_dir.manifest_path.read_bytes()
    run_dir.manifest_path.write_bytes(raw[:int(len(raw) * keep)] if keep < 1 else b"\x00" * len(raw))
    manifest = Manifest.load(run_dir)
    assert set(manifest.units) == {"iter_001/pairs", "iter_001/export"}
    err = capsys.readouterr().err.strip()
    assert "is damaged" in err and "manifest.json.prev" in err and "\n" not in err
    manifest.record("iter_001/done")  # the redone unit; the previous generation stays a good one
    assert set(json.loads(run_dir.manifest_path.read_text())["units"]) == {"iter_001/pairs", "iter_001/export",
                                                                          "iter_001/done"}
    assert set(json.loads(run_dir.previous_manifest_path.read_text())["units"]) == {"iter_001/pairs",
                                                                                   "iter_001/export"}


def test_a_missing_manifest_recovers_from_its_previous_generation(tmp_path, capsys):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    atomic_write_text(run_dir.config_path, "iterations: 1\n")
    recorded(run_dir, "iter_001/pairs", "iter_001/done")
    run_dir.manifest_path.unlink()
    assert set(Manifest.load(RunDir.existing(run_dir.root)).units) == {"iter_001/pairs"}
    assert "it is missing" in capsys.readouterr().err


def test_a_damaged_manifest_without_a_good_previous_generation_is_refused(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    recorded(run_dir, "iter_001/pairs")
    run_dir.manifest_path.write_text('{"version": 1, "uni')
    run_dir.previous_manifest_path.write_text("")
    with pytest.raises(UserError, match="cannot replace it; restore manifest.json from a backup"):
        Manifest.load(run_dir)


@pytest.mark.parametrize("version, fix", [(2, "upgrade rlhf-loop"), (0, "the rlhf-loop version that started it")])
def test_a_manifest_of_another_version_is_refused(tmp_path, version, fix):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    atomic_write_text(run_dir.manifest_path, json.dumps({"version": version, "units": {"iter_009/done": {}}}))
    with pytest.raises(UserError, match=f"manifest version {version}, but this rlhf-loop reads only version 1") as e:
        Manifest.load(run_dir)
    assert fix in str(e.value)


# ---- checksums of whole directories, and what resume does with a damaged unit ----------------------------------------

def checkpoint(run_dir, iteration, step):
    directory = run_dir.iteration(iteration) / "learner" / f"step_{step:06d}"
    atomic_write_text(directory / "latest", f"global_step{step}")
    atomic_write_bytes(directory / f"global_step{step}" / "model_states.pt", os.urandom(4096))
    return directory


def test_a_recorded_tree_verifies_and_names_its_first_damaged_file(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    directory = checkpoint(run_dir, 1, 2)
    Manifest.load(run_dir).record("iter_001/train/step_000002", tree=directory, checkpoint="iter_001/learner/x")
    manifest = Manifest.load(run_dir)
    assert manifest.info("iter_001/train/step_000002")["tree"] == "iter_001/learner/step_000002"
    assert len(manifest.info("iter_001/train/step_000002")["files"]) == 2
    assert manifest.verify_unit("iter_001/train/step_000002") is None
    weights = directory / "global_step2" / "model_states.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[:1000])
    assert manifest.verify_unit("iter_001/train/step_000002") == f"{weights} is truncated (1000 of 4096 bytes)"
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert manifest.verify_unit("iter_001/train/step_000002") == (f"{weights} is corrupt (its sha256 differs from "
                                                                  f"the one recorded)")
    weights.unlink()
    assert manifest.verify_unit("iter_001/train/step_000002") == f"{weights} is missing"


def test_a_damaged_shard_is_dropped_and_redone(tmp_path, capsys):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    manifest = Manifest.load(run_dir)
    for index in range(2):
        shard = run_dir.iteration(1) / "rollouts" / f"shard_{index:05d}.jsonl"
        atomic_write_jsonl(shard, [{"x": index}])
        manifest.record(f"iter_001/rollouts/shard_{index:05d}", files=[shard])
    shard.write_text("")
    assert manifest.done_and_intact("iter_001/rollouts/shard_00000")
    assert not manifest.done_and_intact("iter_001/rollouts/shard_00001")
    assert not manifest.done_and_intact("iter_001/scores/shard_00000")  # never finished: nothing to say
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf-loop: redoing iter_001/rollouts/shard_00001: ")
    assert "truncated" in err[0]
    assert set(Manifest.load(run_dir).units) == {"iter_001/rollouts/shard_00000"}


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_and_redoes_what_followed(tmp_path, capsys):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    manifest = recorded(run_dir, "sft/step_000002", "sft/done", "eval_initial", "iter_001/rollouts/shard_00000",
                        "iter_001/scores/shard_00000", "iter_001/pairs")
    for step in (2, 4):
        directory = checkpoint(run_dir, 1, step)
        manifest.record(f"iter_001/train/step_{step:06d}", tree=directory,
                        checkpoint=str(directory.relative_to(run_dir.root)))
    for unit in ("iter_001/export", "iter_001/sync", "iter_001/eval", "iter_001/done",
                 "iter_002/rollouts/shard_00000"):
        manifest.record(unit)
    (run_dir.iteration(1) / "learner" / "step_000004" / "latest").write_text("global_step9")

    assert manifest.intact_checkpoint("train/step_") == run_dir.iteration(1) / "learner" / "step_000002"
    assert set(Manifest.load(run_dir).units) == {"sft/step_000002", "sft/done", "eval_initial",
                                                 "iter_001/rollouts/shard_00000", "iter_001/scores/shard_00000",
                                                 "iter_001/pairs", "iter_001/train/step_000002"}
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhf-loop: redoing iter_001/train/step_000004 and the 5 unit(s) after it: its checkpoint "
                          "is damaged: ") and "\n" not in err

    (run_dir.iteration(1) / "learner" / "step_000002" / "latest").unlink()  # the first one: nothing before it
    assert manifest.intact_checkpoint("train/step_") is None
    assert not any("train" in unit for unit in Manifest.load(run_dir).units)


def test_a_damaged_checkpoint_without_an_intact_one_before_it_is_refused_and_drops_nothing(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    manifest = Manifest.load(run_dir)
    for step in (2, 4):
        directory = checkpoint(run_dir, 1, step)
        manifest.record(f"iter_001/train/step_{step:06d}", tree=directory,
                        checkpoint=str(directory.relative_to(run_dir.root)))
    manifest.record("iter_001/export")
    shutil.rmtree(run_dir.iteration(1) / "learner" / "step_000002")  # deleted, as the stages delete old checkpoints
    (run_dir.iteration(1) / "learner" / "step_000004" / "latest").write_text("")
    with pytest.raises(UserError, match=r"latest is truncated \(0 of 12 bytes\), and the checkpoint before it "
                                        r"\(iter_001/train/step_000002\) is not intact either"):
        manifest.intact_checkpoint("train/step_")
    assert set(Manifest.load(run_dir).units) == {"iter_001/train/step_000002", "iter_001/train/step_000004",
                                                 "iter_001/export"}


def test_units_from_follows_the_order_of_a_run():
    manifest = Manifest(RunDir(Path("/nonexistent")), {"units": dict.fromkeys([
        "iter_002/rollouts/shard_00000", "iter_001/eval", "iter_001/train/step_000010", "iter_001/train/step_000002",
        "iter_001/pairs_dataset", "iter_001/export", "eval_initial", "sft/done", "sft/step_000004"], {})})
    assert manifest.units_from("iter_001/train/step_000010") == [
        "iter_001/train/step_000010", "iter_001/export", "iter_001/eval", "iter_002/rollouts/shard_00000"]
    assert manifest.units_from("sft/step_000004")[:3] == ["sft/step_000004", "sft/done", "eval_initial"]


# ---- units past their names' padding (iterations: 3 digits, shards: 5, steps: 6) -------------------------------------

def test_units_sort_by_their_numbers_past_the_padding():
    units = ["iter_1001/pairs", "iter_999/pairs", "iter_1000/pairs", "iter_999/rollouts/shard_100000",
             "iter_999/rollouts/shard_99999", "sft/step_1000000", "sft/step_999999"]
    assert sorted(units, key=unit_order) == [
        "iter_999/pairs", "iter_999/rollouts/shard_99999", "iter_999/rollouts/shard_100000", "iter_1000/pairs",
        "iter_1001/pairs", "sft/step_999999", "sft/step_1000000"]
    assert [iteration_of(u) for u in ("iter_999/pairs", "iter_1000/train/step_000002", "eval_initial")] == [
        999, 1000, None]


def test_the_newest_checkpoint_is_found_past_iteration_999(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    manifest = Manifest.load(run_dir)
    for iteration in (999, 1000, 1001):
        directory = checkpoint(run_dir, iteration, 2)
        manifest.record(f"iter_{iteration:03d}/train/step_000002", tree=directory,
                        checkpoint=str(directory.relative_to(run_dir.root)))
    assert manifest.intact_checkpoint("train/step_") == run_dir.root / "iter_1001" / "learner" / "step_000002"
    (run_dir.root / "iter_1001" / "learner" / "step_000002" / "latest").write_text("")  # damaged: the one before
    assert manifest.intact_checkpoint("train/step_") == run_dir.root / "iter_1000" / "learner" / "step_000002"
    assert set(Manifest.load(run_dir).units) == {"iter_999/train/step_000002", "iter_1000/train/step_000002"}


def test_units_from_follows_the_run_past_the_padding():
    manifest = Manifest(RunDir(Path("/nonexistent")), {"units": dict.fromkeys([
        "iter_999/rollouts/shard_99998", "iter_999/rollouts/shard_99999", "iter_999/rollouts/shard_100000",
        "iter_999/done", "iter_1000/rollouts/shard_00000", "iter_1001/done"], {})})
    assert manifest.units_from("iter_999/rollouts/shard_99999") == [
        "iter_999/rollouts/shard_99999", "iter_999/rollouts/shard_100000", "iter_999/done",
        "iter_1000/rollouts/shard_00000", "iter_1001/done"]


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_text(tmp_path / "a.txt", "x")
    with open(tmp_path / "b.txt", "w") as plain:
        plain.write("x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_relative_run_directory_is_made_absolute_for_the_actors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    created = RunDir.create("runs/a", overwrite=False)
    assert created.root == tmp_path / "runs" / "a" and created.root.is_absolute()
    atomic_write_text(created.config_path, "iterations: 1\n")
    assert RunDir.existing("runs/a").root == created.root
