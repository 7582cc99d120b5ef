"""The CLI run as a user runs it, for the tests that need a whole run: in its own process group, killed whole
afterwards (a driver that dies or is killed leaves Ray's processes behind), and a hung run fails the test."""

from __future__ import annotations

import os
import subprocess
import sys

from rlhf_loop.common.faults import KILL_ACTOR_ENV, KILL_AT_ENV
from tests.process_groups import run_in_own_group

RUN_TIMEOUT_S = 600  # a run in the tests takes about a minute; ten means it hangs


def rlhf_loop(*args: str, kill_at: str | None = None, kill_actors: str | None = None) -> subprocess.CompletedProcess:
    """`rlhf-loop ARGS...`; kill_at / kill_actors inject the faults of rlhf_loop.common.faults."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(KILL_AT_ENV, None)
    env.pop(KILL_ACTOR_ENV, None)
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    if kill_actors:
        env[KILL_ACTOR_ENV] = kill_actors
    return run_in_own_group([sys.executable, "-m", "rlhf_loop.frontend.cli", *args], env, RUN_TIMEOUT_S,
                            f"rlhf-loop {' '.join(args)}")
