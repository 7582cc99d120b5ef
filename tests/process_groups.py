"""Processes a test starts in a session of their own and kills as a whole group afterwards, so whatever they leave
behind (Ray's raylet and workers) cannot outlive the test; a process that overruns its time fails the test."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest


def run_in_own_group(argv: list[str], env: dict[str, str], timeout_s: float, what: str,
                     cwd: os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run `argv` to its end (stdout and stderr together), then kill its group; `what` names it in a failure."""
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(process)  # before failing, so a hung run's Ray processes cannot stall the tests after it
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process outside the group still holds the pipe open
            output = "(no output: the pipe stayed open)"
        pytest.fail(f"{what} did not finish in {timeout_s:g} s; its output ends:\n{output[-3000:]}")
    kill_group(process)  # what it left behind in its group
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
