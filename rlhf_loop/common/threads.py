"""Torch's CPU threads for work that runs beside other work on the same cores."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def single_threaded_on_cpu(device) -> Iterator[None]:
    """One torch thread for the block when `device` is the CPU, then the count as it was. For work that overlaps
    another actor's on the same cores (scoring and the learner's reference log-probabilities run while vLLM
    generates): OpenMP regions of several threads each, more threads than cores, wait at every barrier for a thread
    the scheduler has taken off its core, which slowed the toy's generation 1.6x at two threads per actor."""
    import torch

    if str(device) != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
