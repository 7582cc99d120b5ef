"""Dynamic batching for the reward server: concurrent requests are merged into one scoring call per replica.

Each replica is a thread owning one model. It takes the oldest waiting request, then keeps taking waiting requests
of the same shape until it holds `batch_size` responses (or `max_wait_s` has passed), scores them in one call and
hands every request its own slice. Under load, requests that arrive while a replica is busy queue up and are
merged on its next round, so batching grows with traffic without delaying a lone request much. The queue is
bounded: when `max_queued` requests are already waiting, a new one is refused at once (the server answers 503 with
Retry-After) rather than queued behind work that would outlast its timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from reward.base import NamedRewardModel, RewardQuery, RewardResult

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request: either queries (our protocol) or rendered texts (OpenRLHF's, for text-capable models)."""

    queries: list[RewardQuery] | None = None
    texts: list[str] | None = None
    future: Future = field(default_factory=Future)

    @property
    def size(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        return sum(len(q.responses) for q in self.queries)

    def mergeable_with(self, other: Job) -> bool:
        return (self.texts is None) == (other.texts is None)


class QueueFull(Exception):
    """Every replica is busy and the queue holds its maximum of waiting requests."""


class ReplicaPool:
    def __init__(self, models: Sequence[NamedRewardModel], batch_size: int, max_wait_s: float,
                 max_queued: int) -> None:
        self.batch_size, self.max_wait_s = batch_size, max_wait_s
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queued)
        self._threads = [
            threading.Thread(target=self._serve, args=(model,), name=f"reward-replica-{i}", daemon=True)
            for i, model in enumerate(models)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> Future:
        """Queue the job; raises QueueFull instead of waiting when `max_queued` jobs are already waiting."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None
        return job.future

    @property
    def waiting(self) -> int:
        """Requests queued and not yet taken by a replica."""
        return self._queue.qsize()

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)  # waits while the queue is full: the replicas are draining it
        for thread in self._threads:
            thread.join()

    def _serve(self, model: NamedRewardModel) -> None:
        carried: Job | None = None  # taken while filling a batch but of the other shape: it starts the next one
        while True:
            first = carried or self._queue.get()
            carried = None
            if first is None:
                return
            batch, stop = [first], False
            deadline = time.monotonic() + self.max_wait_s
            while sum(job.size for job in batch) < self.batch_size:
                try:
                    job = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                if not job.mergeable_with(first):
                    carried = job
                    break
                batch.append(job)
            self._run(model, [job for job in batch if job.future.set_running_or_notify_cancel()])
            if stop:
                return

    def _run(self, model: NamedRewardModel, batch: list[Job]) -> None:
        """Score the merged batch; if it fails, score each request alone so only the culprit gets the error."""
        if not batch:
            return
        try:
            results = _score(model, batch)
        except Exception as merged_error:
            if len(batch) == 1:
                batch[0].future.set_exception(merged_error)
                return
            for job in batch:
                try:
                    job.future.set_result(_score(model, [job])[0])
                except Exception as error:
                    job.future.set_exception(error)
            return
        for job, result in zip(batch, results):
            job.future.set_result(result)


def _score(model: NamedRewardModel, batch: list[Job]) -> list[list[RewardResult] | RewardResult]:
    """One scoring call for the whole batch, cut back into one answer per job."""
    if batch[0].texts is not None:
        merged = model.score_texts([text for job in batch for text in job.texts])
        answers, start = [], 0
        for job in batch:
            end = start + len(job.texts)
            answers.append(RewardResult(
                scores=merged.scores[start:end],
                objectives={name: values[start:end] for name, values in merged.objectives.items()},
            ))
            start = end
        return answers
    results = model.score([query for job in batch for query in job.queries])
    answers, start = [], 0
    for job in batch:
        answers.append(results[start:start + len(job.queries)])
        start += len(job.queries)
    return answers
