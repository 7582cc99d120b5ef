"""The console: what a person watching a run sees, apart from what the libraries under it print.

    with quiet(verbose) as log:           # from here on, what the process prints goes to a log ...
        run_dir = ...
        log.into(run_dir.root / "logs")    # ... kept in a temporary file until the run directory exists
        say("iter 1/3  reward ...")        # ours: on the console and in the log

While quiet, everything the process and its libraries write (Python's stdout and stderr, the file descriptors
under them, so C++ and child processes too, `logging` and `warnings`) goes to RUN_DIR/logs/driver.log; the console
keeps our progress bars (`stream()`), `say` lines and errors. `verbose` leaves the console as it always was.

A leaf module (it imports nothing of ours but `rlhf_loop.common.errors`): policy/ and reward/ call `say` too.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from rlhf_loop.common.errors import UserError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_logger = logging.getLogger("rlhf_loop")
_console: TextIO | None = None  # the terminal, while the process is quiet


def stream() -> TextIO:
    """Where our progress bars and lines go: the terminal, even while the process is quiet."""
    return _console or sys.stderr


def say(text: str) -> None:
    """A line for the person at the console (progress bars are redrawn below it), and for the log."""
    tqdm.write(text, file=stream())
    if _console is not None:
        _logger.info(text.removeprefix("rlhf-loop: "))  # the log names its logger already


def is_quiet() -> bool:
    """Whether the process's output goes to a log (inside `quiet`), so that libraries should not print to ours."""
    return _console is not None


class Log:
    """Where a quiet process's output goes: a temporary file, then RUN_DIR/logs/driver.log."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.buffer = tempfile.TemporaryFile() if quiet else None  # until the run directory exists

    def into(self, directory: Path) -> None:
        """Append what was written so far, and everything from now on, to `directory`/driver.log."""
        if not self.quiet:
            return
        directory.mkdir(parents=True, exist_ok=True)
        _flush()  # what Python still buffers belongs to the temporary file, which is copied now
        with open(directory / "driver.log", "ab") as log:  # append: a resumed run's log goes on
            if self.buffer is not None:
                self.buffer.seek(0)
                shutil.copyfileobj(self.buffer, log)
                log.flush()
            _point_output_at(log.fileno())
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None

    def replay(self, console: TextIO) -> None:
        """What the process printed before it had a run directory (where "see the error above" points)."""
        if self.buffer is not None:
            _flush()
            self.buffer.seek(0)
            console.write(self.buffer.read().decode(errors="replace"))
            console.flush()


@contextmanager
def quiet(verbose: bool = False) -> Iterator[Log]:
    """Send the process's output to a log and keep the console for our lines; `verbose`: change nothing."""
    global _console
    log = Log(quiet=not verbose)
    if verbose:
        yield log
        return
    _flush()
    saved = os.dup(1), os.dup(2)
    _console = open(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    _point_output_at(log.buffer.fileno())
    log_stream = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    handler = logging.StreamHandler(log_stream)  # the descriptor, not sys.stderr: that may be replaced (pytest)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root, root_level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield log
    except BaseException as e:
        _logger.error("stopped by %s", type(e).__name__, exc_info=True)
        if isinstance(e, Exception) and not isinstance(e, UserError):
            log.replay(_console)  # before the run directory exists, the traceback alone may not say enough
        raise
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        log_stream.close()
        root.setLevel(root_level)
        _flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        _console.close()
        _console = None
        if log.buffer is not None:
            log.buffer.close()


def _point_output_at(fd: int) -> None:
    _flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def _flush() -> None:
    for output in (sys.stdout, sys.stderr):
        try:
            output.flush()
        except (OSError, ValueError):  # closed or detached
            pass
