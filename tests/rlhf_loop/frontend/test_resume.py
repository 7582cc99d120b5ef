"""`rlhf-loop resume RUN_DIR key=value`: the keys no finished unit depends on may change (and config.yaml is frozen
again, with its fingerprint), every other key is refused with one line, and a hand-edited config.yaml still is."""

import hashlib
import json

import pytest

from rlhf_loop import loop
from rlhf_loop.frontend import cli
from rlhf_loop.config import load_config
from rlhf_loop.common.errors import UserError
from rlhf_loop.frontend.fingerprints import PENDING_CONFIG, check_inputs
from rlhf_loop.rundir.manifest import Manifest, RunDir
from rlhf_loop.common.files import sha256_file


@pytest.fixture
def started(tmp_path, cli_without_models):
    """A run of 2 iterations started through the CLI, with one iteration finished; returns its directory."""
    config, _ = cli_without_models
    root = tmp_path / "run"
    assert cli.main(["run", str(config), "iterations=2", "--run-dir", str(root)]) == 0
    Manifest.load(RunDir(root)).record("iter_001/done")
    return RunDir(root)


def refused(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhf-loop: error: ") and "\n" not in err, err
    assert message in err, err


def test_extending_a_run_refreezes_its_config_and_fingerprint(started, capsys, monkeypatch):
    resumed = []
    monkeypatch.setattr(loop, "run", lambda cfg, run_dir, early_actors=None: resumed.append(cfg))
    assert cli.main(["resume", str(started.root), "iterations=5", "wandb.mode=offline"]) == 0
    assert (resumed[0].iterations, resumed[0].wandb.mode) == (5, "offline")
    frozen = load_config(started.config_path)
    assert (frozen.iterations, frozen.wandb.mode) == (5, "offline")
    fingerprints = Manifest.load(started).fingerprints
    assert fingerprints["config.yaml"] == sha256_file(started.config_path) and PENDING_CONFIG not in fingerprints
    assert cli.main(["resume", str(started.root)]) == 0  # the new config is the run's config now
    assert resumed[-1].iterations == 5


def test_a_config_edited_by_hand_is_still_refused_after_an_extension(started, capsys):
    assert cli.main(["resume", str(started.root), "iterations=3"]) == 0
    started.config_path.write_text(started.config_path.read_text().replace("seed: 0", "seed: 1"))
    refused(capsys, ["resume", str(started.root)], "config.yaml changed since the run began")
    refused(capsys, ["resume", str(started.root), "iterations=4"], "config.yaml changed since the run began")


@pytest.mark.parametrize("override", ["train.beta=0.2", "rollout.samples_per_prompt=4", "seed=1", "+foo=1"])
def test_keys_the_finished_units_depend_on_are_refused(started, capsys, override):
    before = started.config_path.read_text()
    refused(capsys, ["resume", str(started.root), override],
            f"resume cannot change '{override.partition('=')[0].lstrip('+')}'")
    assert started.config_path.read_text() == before


def test_the_refusal_names_the_safe_keys(started, capsys):
    refused(capsys, ["resume", str(started.root), "train.beta=0.2"],
            "a resume changes only iterations, wandb.*, cluster.*, rollout.call_timeout_s")


def test_fewer_iterations_than_are_finished_are_refused(started, capsys):
    Manifest.load(started).record("iter_002/done")
    refused(capsys, ["resume", str(started.root), "iterations=1"],
            "iterations=1 is below the 2 iterations")
    assert load_config(started.config_path).iterations == 2


def test_safe_keys_still_get_the_config_checks(started, capsys):
    refused(capsys, ["resume", str(started.root), "cluster.max_actor_restarts=-1"],
            "cluster.max_actor_restarts must be >= 0")
    refused(capsys, ["resume", str(started.root), "wandb.projekt=x"], "unknown key 'wandb.projekt'")


def test_a_refreeze_cut_short_after_writing_config_yaml_is_accepted(started):
    """The crash window of refreeze_config: the new digest is pending, config.yaml is the new one."""
    new_text = started.config_path.read_text().replace("iterations: 2", "iterations: 3")
    manifest = Manifest.load(started)
    manifest.record_fingerprints({**manifest.fingerprints,
                                  PENDING_CONFIG: hashlib.sha256(new_text.encode()).hexdigest()})
    started.config_path.write_text(new_text)
    check_inputs(started, load_config(started.config_path))
    fingerprints = Manifest.load(started).fingerprints
    assert PENDING_CONFIG not in fingerprints and fingerprints["config.yaml"] == sha256_file(started.config_path)
    started.config_path.write_text(new_text.replace("seed: 0", "seed: 2"))
    with pytest.raises(UserError, match="changed since the run began"):
        check_inputs(started, load_config(started.config_path))


def test_without_overrides_config_yaml_is_not_rewritten(started):
    before = (started.config_path.stat().st_mtime_ns, json.loads(started.manifest_path.read_text())["fingerprints"])
    assert cli.main(["resume", str(started.root)]) == 0
    after = (started.config_path.stat().st_mtime_ns, json.loads(started.manifest_path.read_text())["fingerprints"])
    assert after == before
