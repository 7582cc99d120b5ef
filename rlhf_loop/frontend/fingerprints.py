"""Fingerprints of a run's inputs, taken when it starts and checked when it resumes.

A resumed run must see the inputs its finished units were computed from: the frozen config (RUN_DIR/config.yaml)
and every local prompt or pair file it names. Their sha256 go into the manifest at the start; `resume` refuses
with one line when one changed. Hub datasets are recorded by name only: pinning their revision is a TODO.
`resume` with overrides (rlhf_loop/frontend/resume.py) replaces config.yaml on purpose, and its fingerprint with it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from rlhf_loop.common.console import say
from rlhf_loop.driver.data import LOCAL_FORMATS
from rlhf_loop.common.errors import UserError
from rlhf_loop.rundir.manifest import Manifest, RunDir
from rlhf_loop.common.files import atomic_write_text, sha256_file

HUB = "hub dataset (revision not pinned)"
PENDING_CONFIG = "config.yaml pending"  # the digest of a config.yaml being replaced by refreeze_config


def input_sources(cfg) -> dict[str, list[str]]:
    """The datasets a run reads, by config key (a key the run ignores, e.g. sft.dataset without sft, is left out)."""
    online = cfg.online
    sources = {"data.prompts": list(cfg.data.prompts) if online else [],
               "eval.prompts": [cfg.eval.prompts] if cfg.evaluates else [],
               "pairs.dataset": [] if online else [cfg.pairs.dataset],
               "sft.dataset": [cfg.sft.dataset] if cfg.sft.enabled else []}
    return {key: [source for source in values if source] for key, values in sources.items() if any(values)}


def input_fingerprints(run_dir: RunDir, cfg) -> dict[str, Any]:
    """sha256 of config.yaml and of each local dataset file (hub datasets: their name)."""
    return {
        "config.yaml": sha256_file(run_dir.config_path),
        "inputs": {key: {source: sha256_file(source) if _is_local(source) else HUB for source in sources}
                   for key, sources in input_sources(cfg).items()},
    }


def record_inputs(run_dir: RunDir, cfg) -> None:
    """At the start of a run, after config.yaml is written."""
    Manifest.load(run_dir).record_fingerprints(input_fingerprints(run_dir, cfg))


def check_inputs(run_dir: RunDir, cfg) -> None:
    """At resume: refuse when the config or a local input file changed since the run began."""
    manifest = Manifest.load(run_dir)
    if manifest.fingerprints is None:
        say(f"rlhf-loop: {run_dir.root} has no input fingerprints (started before rlhf-loop kept them); "
            f"recording them now")
        manifest.record_fingerprints(input_fingerprints(run_dir, cfg))
        return
    recorded = manifest.fingerprints
    config_digest = sha256_file(run_dir.config_path)
    if config_digest == recorded.get(PENDING_CONFIG):  # a refreeze_config cut short after writing config.yaml
        _record_config(manifest, config_digest)
    elif config_digest != recorded["config.yaml"]:
        raise UserError(f"{run_dir.config_path} changed since the run began, but a run's config is frozen: restore "
                        f"it, or start a new run with the changed config (`rlhf-loop run CONFIG`)")
    for key, sources in recorded["inputs"].items():
        for source, digest in sources.items():
            if digest == HUB:
                continue
            if not Path(source).is_file():
                raise UserError(f"{key} file {source} is missing (it was there when the run began; a relative path "
                                f"is read from the directory you resume in): restore it, or resume from that "
                                f"directory")
            if sha256_file(source) != digest:
                raise UserError(f"{key} file {source} changed since the run began, so its finished units were "
                                f"computed from other data: restore the file, or start a new run "
                                f"(`rlhf-loop run CONFIG`)")


def refreeze_config(run_dir: RunDir, text: str) -> None:
    """Replace the frozen config.yaml on purpose (a resume's safe overrides). Its new digest is recorded as pending
    first, so a crash between the two writes leaves a config.yaml that check_inputs accepts: the old or the new."""
    manifest = Manifest.load(run_dir)
    digest = hashlib.sha256(text.encode()).hexdigest()
    manifest.record_fingerprints({**manifest.fingerprints, PENDING_CONFIG: digest})
    atomic_write_text(run_dir.config_path, text)
    _record_config(manifest, digest)


def _record_config(manifest: Manifest, digest: str) -> None:
    fingerprints = {key: value for key, value in manifest.fingerprints.items() if key != PENDING_CONFIG}
    manifest.record_fingerprints({**fingerprints, "config.yaml": digest})


def _is_local(source: str) -> bool:
    return Path(source).suffix in LOCAL_FORMATS
