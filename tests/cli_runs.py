"""The CLI run as a user runs it, for the tests that need a whole run: in its own process group, killed whole
afterwards (a driver that dies or is killed leaves Ray's processes behind), and a hung run fails the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from rlhf_loop.common.faults import KILL_ACTOR_ENV, KILL_AT_ENV

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
    process = subprocess.Popen([sys.executable, "-m", "rlhf_loop.frontend.cli", *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)  # before failing, so a hung run's Ray processes cannot stall the tests after it
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process outside the group still holds the pipe open
            output = "(no output: the pipe stayed open)"
        pytest.fail(f"rlhf-loop {' '.join(args)} did not finish in {RUN_TIMEOUT_S} s; its output ends:\n"
                    f"{output[-3000:]}")
    _kill_group(process.pid)
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
