"""What `rlhf-loop resume RUN_DIR key=value ...` may change: only what no finished unit of work depends on.

    cfg = resumed_config(run_dir, ["iterations=5"])   # checks, changes and freezes config.yaml again

A run's config is frozen into RUN_DIR/config.yaml when it starts, because its finished units were computed with it.
Extending the run (iterations), where it logs (wandb.*), which cluster runs it (cluster.*) and how long a call may
take before it counts as hung (*.call_timeout_s) change no finished unit, so a resume may change them; anything
else needs a new run.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from rlhf_loop.common.errors import UserError

SAFE_ON_RESUME = ("iterations", "wandb.*", "cluster.*", "rollout.call_timeout_s", "reward.call_timeout_s",
                  "train.call_timeout_s", "sft.call_timeout_s")


def resumed_config(run_dir, overrides: list[str]):
    """The run's frozen config once it and the run's input files are found unchanged; with `overrides` (safe keys
    only, and no fewer iterations than are finished), the changed config, checked and frozen in its place."""
    from rlhf_loop.config import load_config, to_yaml
    from rlhf_loop.frontend.fingerprints import check_inputs, refreeze_config
    from rlhf_loop.frontend.preflight import preflight
    from rlhf_loop.rundir.manifest import Manifest

    check_inputs(run_dir, load_config(run_dir.config_path))  # a config.yaml edited by hand is refused here
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if not any(fnmatchcase(key, pattern) for pattern in SAFE_ON_RESUME):
            raise UserError(f"resume cannot change {key!r}: the run's finished units were computed with it; a resume "
                            f"changes only {', '.join(SAFE_ON_RESUME)}; start a new run (`rlhf-loop run`) for the rest")
    cfg = load_config(run_dir.config_path, overrides)
    finished = sum(1 for unit in Manifest.load(run_dir).units if re.fullmatch(r"iter_\d+/done", unit))
    if cfg.iterations < finished:
        raise UserError(f"iterations={cfg.iterations} is below the {finished} iterations {run_dir.root} has finished; "
                        f"give iterations={finished} or more")
    preflight(cfg)  # e.g. enough prompts for the added iterations, before anything is written
    if overrides:
        refreeze_config(run_dir, to_yaml(cfg))
    return cfg
