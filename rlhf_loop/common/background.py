"""Work in a background thread whose result or error is waited for later, by whoever needs it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


def in_background(work: Callable[..., Any], *args: Any, name: str) -> Future:
    """`work(*args)` in a daemon thread called `name` (a failed run exits without waiting for it); its result or
    error in a Future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(work(*args))
        except BaseException as error:  # handed to whoever waits on the future
            future.set_exception(error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
