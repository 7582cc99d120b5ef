"""RUN_DIR/heartbeat.json: which process runs the run, on which host, in which stage, and how it ended.

A background thread rewrites it every `HEARTBEAT_INTERVAL_S` while the run's process lives, so `rlhf-loop status`
can tell a run that stopped without saying so (SIGKILL, out of memory, a lost machine: the heartbeat goes stale, or
its process is gone) from one that is working through a long stage or that ended with an error.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rlhf_loop.rundir.manifest import RunDir
from rlhf_loop.common.files import atomic_write_json

HEARTBEAT_INTERVAL_S = 30.0
_lock = threading.Lock()  # the stages' writes and the background beat must not interleave


def write_heartbeat(run_dir: RunDir, stage: str | None = None, ended: str | None = None) -> None:
    """This process, the stage it is in (None: the one it was in) and since when, and, once it exits, how."""
    with _lock:
        previous = read_heartbeat(run_dir) or {}
        ours = previous.get("pid") == os.getpid()
        stage = stage or (previous.get("stage") if ours else None) or "start"
        now = time.time()
        atomic_write_json(run_dir.heartbeat_path, {
            "time": now, "pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
            "stage_since": previous["stage_since"] if ours and previous.get("stage") == stage else now,
            "ended": ended,
        })


def read_heartbeat(run_dir: RunDir) -> dict[str, Any] | None:
    try:
        return json.loads(run_dir.heartbeat_path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def beating(run_dir: RunDir, interval_s: float = HEARTBEAT_INTERVAL_S) -> Iterator[None]:
    """Keep heartbeat.json fresh while the block runs, then record how it ended ("finished", or the error)."""
    write_heartbeat(run_dir, "start")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s):
            write_heartbeat(run_dir)

    thread = threading.Thread(target=beat, name="rlhf-loop-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    except BaseException as e:
        ended = f"failed: {type(e).__name__}: {e}".splitlines()[0][:300]
        raise
    else:
        ended = "finished"
    finally:
        stop.set()
        thread.join()
        write_heartbeat(run_dir, ended=ended)
