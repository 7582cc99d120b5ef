"""A quiet process: the libraries' output (Python and C level, logging, warnings, child processes) goes to the log,
ours and errors to the console. Each case runs in a child process, whose stderr is its console."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.integration  # child processes

NOISE = """
import logging, os, subprocess, sys, warnings
from tqdm import tqdm
from rlhf_loop.common.console import is_quiet, quiet, say, stream

def noise(tag):
    print(f"{tag} print to stdout")
    print(f"{tag} print to stderr", file=sys.stderr)
    os.write(2, f"{tag} C-level write to fd 2\\n".encode())
    warnings.warn(f"{tag} a library warning")
    logging.getLogger("vllm").warning(f"{tag} a library's logging")
    subprocess.run([sys.executable, "-c", f"print('{tag} a child process')"], check=True)
"""


def run_child(body: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, str]:
    """Run NOISE + body in a child; returns it and the text of tmp_path/logs/driver.log ("" when there is none)."""
    code = NOISE + textwrap.dedent(body).replace("LOGS", repr(str(tmp_path / "logs")))
    buffered = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # as a user runs it
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                           env=buffered)
    log = tmp_path / "logs" / "driver.log"
    return child, log.read_text() if log.exists() else ""


def test_quiet_sends_the_libraries_output_to_the_log_and_ours_to_the_console(tmp_path):
    child, log = run_child("""
        from pathlib import Path
        with quiet() as log:
            noise("before")  # no run directory yet: kept, then moved into the log
            log.into(Path(LOGS))
            noise("after")
            say("iter 1/1  reward 0.5")
            for _ in tqdm(range(3), desc="our bar", file=stream()):
                pass
            print(f"quiet {is_quiet()}", file=stream())
        print(f"quiet once done {is_quiet()}", file=sys.stderr)
    """, tmp_path)
    assert child.returncode == 0, child.stderr
    console = child.stderr
    assert "iter 1/1  reward 0.5" in console and "our bar" in console
    assert "quiet True" in console and "quiet once done False" in console
    assert child.stdout == ""
    for tag in ("before", "after"):
        for what in ("print to stdout", "print to stderr", "C-level write to fd 2", "a library warning",
                     "a library's logging", "a child process"):
            assert f"{tag} {what}" in log, f"{tag} {what}"
            assert f"{tag} {what}" not in console, f"{tag} {what}"
    assert log.index("before print to stdout") < log.index("after print to stdout")
    assert "iter 1/1  reward 0.5" in log  # ours is in the log too


def test_after_quiet_the_process_prints_as_before(tmp_path):
    child, _ = run_child("""
        from pathlib import Path
        with quiet() as log:
            log.into(Path(LOGS))
        noise("later")
    """, tmp_path)
    assert "later print to stdout" in child.stdout
    assert "later C-level write to fd 2" in child.stderr and "later a child process" in child.stdout


def test_verbose_changes_nothing(tmp_path):
    child, log = run_child("""
        from pathlib import Path
        with quiet(verbose=True) as log:
            log.into(Path(LOGS))
            noise("verbose")
            say("our line")
    """, tmp_path)
    assert "verbose print to stderr" in child.stderr and "verbose a library warning" in child.stderr
    assert "verbose print to stdout" in child.stdout and "our line" in child.stderr
    assert log == ""


@pytest.mark.parametrize("into", [True, False], ids=["with_a_run_directory", "before_it"])
def test_an_unexpected_error_reaches_the_console_whole(tmp_path, into):
    child, log = run_child(f"""
        from pathlib import Path
        def deep():
            raise RuntimeError("the model file is truncated")
        with quiet() as log:
            noise("early")
            if {into}:
                log.into(Path(LOGS))
            deep()
    """, tmp_path)
    assert child.returncode == 1
    assert "Traceback (most recent call last)" in child.stderr and "in deep" in child.stderr
    assert child.stderr.rstrip().endswith("RuntimeError: the model file is truncated")
    if into:  # the log has it too; the console only the traceback
        assert "RuntimeError: the model file is truncated" in log and "early print to stderr" not in child.stderr
    else:  # no log to point to: what came before the error is shown with it
        assert "early print to stderr" in child.stderr


def test_a_user_error_stays_one_line(tmp_path):
    child, log = run_child("""
        from pathlib import Path
        from rlhf_loop.common.errors import UserError
        try:
            with quiet() as log:
                log.into(Path(LOGS))
                noise("noise")
                raise UserError("data.prompts file x.jsonl is missing")
        except UserError as e:
            print(f"rlhf-loop: error: {e}", file=sys.stderr)
    """, tmp_path)
    assert child.stderr == "rlhf-loop: error: data.prompts file x.jsonl is missing\n"
    assert "UserError: data.prompts file x.jsonl is missing" in log
