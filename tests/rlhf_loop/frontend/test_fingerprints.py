import json

import pytest

from rlhf_loop.frontend import cli
from rlhf_loop.config import load_config
from rlhf_loop.common.errors import UserError
from rlhf_loop.frontend.fingerprints import HUB, check_inputs, input_fingerprints, record_inputs
from rlhf_loop.rundir.heartbeat import read_heartbeat
from rlhf_loop.rundir.manifest import Manifest, RunDir
from rlhf_loop.common.files import atomic_write_json, atomic_write_text


@pytest.fixture
def started(tmp_path):
    """A run started on a local prompt file, a hub dataset and a local SFT file; returns (run_dir, cfg)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name 3 fruits."}\n')
    (tmp_path / "sft.jsonl").write_text('{"messages": []}\n')
    config = tmp_path / "run.yaml"
    config.write_text(f"iterations: 2\npolicy: {{model_path: p}}\nreward: {{model_path: r}}\n"
                      f"data: {{prompts: [{prompts}, org/more-prompts]}}\n"
                      f"sft: {{enabled: true, dataset: {tmp_path / 'sft.jsonl'}}}\n")
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    atomic_write_text(run_dir.config_path, config.read_text())
    cfg = load_config(run_dir.config_path)
    record_inputs(run_dir, cfg)
    return run_dir, cfg


def test_the_config_and_every_local_input_are_fingerprinted(started, tmp_path):
    run_dir, cfg = started
    fingerprints = Manifest.load(run_dir).fingerprints
    assert set(fingerprints["inputs"]) == {"data.prompts", "sft.dataset"}
    assert fingerprints["inputs"]["data.prompts"]["org/more-prompts"] == HUB
    assert len(fingerprints["inputs"]["data.prompts"][str(tmp_path / "prompts.jsonl")]) == 64
    check_inputs(run_dir, cfg)  # nothing changed


@pytest.mark.parametrize("change, message", [
    (lambda tmp: (tmp / "prompts.jsonl").write_text('{"prompt": "Name 4 fruits."}\n'),
     "data.prompts file {tmp}/prompts.jsonl changed since the run began"),
    (lambda tmp: (tmp / "sft.jsonl").unlink(), "sft.dataset file {tmp}/sft.jsonl is missing"),
    (lambda tmp: (tmp / "run" / "config.yaml").write_text((tmp / "run" / "config.yaml").read_text() + "seed: 1\n"),
     "{tmp}/run/config.yaml changed since the run began"),
])
def test_resume_refuses_when_an_input_changed(started, tmp_path, change, message):
    run_dir, cfg = started
    change(tmp_path)
    with pytest.raises(UserError, match="changed|missing") as refused:
        check_inputs(run_dir, cfg)
    assert message.format(tmp=tmp_path) in str(refused.value) and "\n" not in str(refused.value)


def test_a_run_from_before_fingerprints_gets_them_at_its_first_resume(started, capsys):
    run_dir, cfg = started
    data = json.loads(run_dir.manifest_path.read_text())
    del data["fingerprints"]
    atomic_write_json(run_dir.manifest_path, data)
    check_inputs(run_dir, cfg)
    assert "recording them now" in capsys.readouterr().err
    recorded = Manifest.load(run_dir).fingerprints
    assert recorded == input_fingerprints(run_dir, cfg)  # config.yaml and every local input, as a new run has them
    assert set(recorded["inputs"]) == {"data.prompts", "sft.dataset"}
    check_inputs(run_dir, cfg)  # the next resume checks against them, and nothing changed


def test_run_records_and_resume_checks_through_the_cli(tmp_path, capsys, cli_without_models):
    config, prompts = cli_without_models
    root = tmp_path / "run"
    assert cli.main(["run", str(config), "--run-dir", str(root)]) == 0
    assert read_heartbeat(RunDir(root))["ended"] == "finished"
    assert cli.main(["resume", str(root)]) == 0
    prompts.write_text('{"prompt": "Name 5 fruits."}\n')
    capsys.readouterr()
    assert cli.main(["resume", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhf-loop: error: data.prompts file") and "changed since the run began" in err
