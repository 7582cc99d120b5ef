"""ReplicaPool: concurrent requests merged into one scoring call per replica, each request answered with its own
slice, a failing request isolated, and every replica thread gone after close."""

from __future__ import annotations

import threading

import pytest

from reward.base import RewardQuery, RewardResult
from reward.batcher import Job, ReplicaPool

WAIT_S = 5.0  # generous bound on every wait, so a broken pool fails the test instead of hanging it


def query(*responses: str) -> RewardQuery:
    return RewardQuery([{"role": "user", "content": "q"}], list(responses))


def value(text: str) -> float:
    """The fake model's score of a response: the number it names ("7" -> 7.0)."""
    return float(text.split(":")[-1])


class FakeModel:
    """Scores a response by the number it holds; "bad" fails the call; "hold" blocks it until `release` is set."""

    objectives = ["double"]

    def __init__(self, barrier: threading.Barrier | None = None):
        self.calls: list[tuple[str, list[int]]] = []  # ("score", responses per query) or ("texts", [count])
        self.threads: set[str] = set()
        self.entered, self.release = threading.Event(), threading.Event()
        self.barrier = barrier

    def _enter(self, texts: list[str]) -> None:
        self.threads.add(threading.current_thread().name)
        if "hold" in texts:
            self.entered.set()
            assert self.release.wait(WAIT_S)
        if self.barrier is not None:
            self.barrier.wait(WAIT_S)
        if "bad" in texts:
            raise ValueError("bad response")

    def score(self, queries):
        texts = [r for q in queries for r in q.responses]
        self.calls.append(("score", [len(q.responses) for q in queries]))
        self._enter(texts)
        return [RewardResult([0.0 if r == "hold" else value(r) for r in q.responses],
                             {"double": [0.0 if r == "hold" else 2 * value(r) for r in q.responses]})
                for q in queries]

    def score_texts(self, texts):
        self.calls.append(("texts", [len(texts)]))
        self._enter(texts)
        return RewardResult([value(t) for t in texts], {"double": [2 * value(t) for t in texts]})


@pytest.fixture
def pools():
    """Pools made by a test are closed at its end, blocked models released first, so no thread outlives it."""
    made: list[tuple[ReplicaPool, list[FakeModel]]] = []

    def make(models, batch_size=4, max_wait_s=0.05):
        pool = ReplicaPool(models, batch_size, max_wait_s, max_queued=256)
        made.append((pool, models))
        return pool

    yield make
    for pool, models in made:
        for model in models:
            model.release.set()
        if any(thread.is_alive() for thread in pool._threads):
            close_within(pool)


def close_within(pool: ReplicaPool) -> bool:
    """pool.close(), bounded: a close that would hang fails the test instead (the replica threads are daemons)."""
    closer = threading.Thread(target=pool.close, daemon=True)
    closer.start()
    closer.join(WAIT_S)
    return not closer.is_alive()


def hold(pool: ReplicaPool, model: FakeModel) -> Job:
    """Keep the replica busy, so the next jobs queue up behind it."""
    job = Job(queries=[query("hold")])
    pool.submit(job)
    assert model.entered.wait(WAIT_S)
    return job


def greedy_batches(sizes: list[int], batch_size: int) -> list[list[int]]:
    """The documented rule: take the oldest request, then more until the batch holds batch_size responses."""
    batches, current = [], []
    for size in sizes:
        current.append(size)
        if sum(current) >= batch_size:
            batches.append(current)
            current = []
    return batches + ([current] if current else [])


@pytest.mark.parametrize("sizes, batch_size", [([1] * 10, 4), ([2, 2, 2, 1, 3, 5, 1], 5), ([3], 8)])
def test_waiting_requests_are_merged_up_to_the_batch_size(pools, sizes, batch_size):
    model = FakeModel()
    pool = pools([model], batch_size=batch_size)
    blocker = hold(pool, model)
    jobs = [Job(queries=[query(*(f"{j}:{j * 10 + r}" for r in range(size)))]) for j, size in enumerate(sizes)]
    futures = [pool.submit(job) for job in jobs]
    model.release.set()
    for job, future in zip(jobs, futures, strict=True):
        (result,) = future.result(WAIT_S)
        assert result.scores == [value(r) for r in job.queries[0].responses]
        assert result.objectives == {"double": [2 * value(r) for r in job.queries[0].responses]}
    assert blocker.future.result(WAIT_S)[0].scores == [0.0]
    assert [call for _, call in model.calls[1:]] == greedy_batches(sizes, batch_size)


def test_each_job_gets_its_own_queries_results(pools):
    model = FakeModel()
    pool = pools([model], batch_size=100)
    hold(pool, model)
    jobs = [Job(queries=[query(f"{j}", f"{j}.5"), query(f"{-j}")]) for j in range(5)]
    futures = [pool.submit(job) for job in jobs]
    model.release.set()
    for j, future in enumerate(futures):
        assert [r.scores for r in future.result(WAIT_S)] == [[j, j + 0.5], [-j]]
    assert len(model.calls) == 2  # all five in one call


def test_text_jobs_are_sliced_and_never_merged_with_query_jobs(pools):
    model = FakeModel()
    pool = pools([model], batch_size=100)
    hold(pool, model)
    first = pool.submit(Job(queries=[query("1")]))
    texts = [pool.submit(Job(texts=["2", "3"])), pool.submit(Job(texts=["4"]))]
    last = pool.submit(Job(queries=[query("5", "6")]))
    model.release.set()
    assert first.result(WAIT_S)[0].scores == [1.0]
    assert texts[0].result(WAIT_S) == RewardResult([2.0, 3.0], {"double": [4.0, 6.0]})
    assert texts[1].result(WAIT_S) == RewardResult([4.0], {"double": [8.0]})
    assert last.result(WAIT_S)[0].scores == [5.0, 6.0]
    assert model.calls[1:] == [("score", [1]), ("texts", [3]), ("score", [2])]


def test_a_failing_request_gets_the_error_and_the_others_their_results(pools):
    model = FakeModel()
    pool = pools([model], batch_size=100)
    hold(pool, model)
    good = [pool.submit(Job(queries=[query(f"{j}")])) for j in range(3)]
    bad = pool.submit(Job(queries=[query("bad")]))
    more = pool.submit(Job(queries=[query("9")]))
    model.release.set()
    assert [f.result(WAIT_S)[0].scores for f in good] == [[0.0], [1.0], [2.0]]
    assert more.result(WAIT_S)[0].scores == [9.0]
    with pytest.raises(ValueError, match="bad response"):
        bad.result(WAIT_S)
    # alone, it fails again; the pool still serves afterwards
    with pytest.raises(ValueError, match="bad response"):
        pool.submit(Job(queries=[query("bad")])).result(WAIT_S)
    assert pool.submit(Job(texts=["7"])).result(WAIT_S).scores == [7.0]


def test_a_cancelled_job_is_not_scored(pools):
    model = FakeModel()
    pool = pools([model], batch_size=100)
    hold(pool, model)
    cancelled = Job(queries=[query("1")])
    pool.submit(cancelled)
    assert cancelled.future.cancel()
    kept = pool.submit(Job(queries=[query("2")]))
    model.release.set()
    assert kept.result(WAIT_S)[0].scores == [2.0]
    assert model.calls[1:] == [("score", [1])]


def test_replicas_share_the_work(pools):
    barrier = threading.Barrier(2)  # each call waits for the other replica's: only two threads at once pass
    models = [FakeModel(barrier), FakeModel(barrier)]
    pool = pools(models, batch_size=1, max_wait_s=0.0)
    futures = [pool.submit(Job(queries=[query(f"{j}")])) for j in range(2)]
    assert sorted(f.result(WAIT_S)[0].scores[0] for f in futures) == [0.0, 1.0]
    assert [len(m.calls) for m in models] == [1, 1]
    assert len(models[0].threads | models[1].threads) == 2


def test_close_ends_every_replica_thread(pools):
    models = [FakeModel(), FakeModel(), FakeModel()]
    pool = pools(models)
    assert pool.submit(Job(queries=[query("1")])).result(WAIT_S)[0].scores == [1.0]
    assert close_within(pool)
    assert not any(thread.is_alive() for thread in pool._threads)
    assert not [t for t in threading.enumerate() if t in pool._threads]


def test_close_finishes_the_requests_already_queued(pools):
    model = FakeModel()
    pool = pools([model], batch_size=100, max_wait_s=0.2)
    hold(pool, model)
    queued = [pool.submit(Job(queries=[query(f"{j}")])) for j in range(3)]
    closer = threading.Thread(target=pool.close, daemon=True)
    closer.start()  # while the replica is still busy: its stop signals queue up behind the requests
    model.release.set()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    assert [f.result(0)[0].scores for f in queued] == [[0.0], [1.0], [2.0]]
    assert not any(thread.is_alive() for thread in pool._threads)
