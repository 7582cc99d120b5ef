"""The colocation schedule against a fake per-device memory ledger: each role allocates and frees what vLLM and
DeepSpeed would, and the ledger refuses to go over the GPU's capacity."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from policy.colocation import KV_CACHE, WEIGHTS, ColocationSchedule

GIB = 1 << 30
CAPACITY = 80 * GIB
ENGINE = {WEIGHTS: 16 * GIB, KV_CACHE: 30 * GIB}  # what the engine was started with
LEARNER_WEIGHTS, OPTIMIZER, TRAINING_CACHE = 16 * GIB, 32 * GIB, 20 * GIB  # activations left in the allocator cache


class OutOfMemory(Exception):
    pass


class Ledger:
    """One GPU: what each holder has on it, and the most it ever held."""

    def __init__(self, capacity: int):
        self.capacity, self.held, self.peak = capacity, {}, 0

    def allocate(self, holder: str, nbytes: int) -> None:
        if sum(self.held.values()) + nbytes > self.capacity:
            raise OutOfMemory(f"{holder}: {nbytes / GIB:g} GiB more than the {self.capacity / GIB:g} GiB GPU holds; "
                              f"held {dict((k, v / GIB) for k, v in self.held.items())}")
        self.held[holder] = self.held.get(holder, 0) + nbytes
        self.peak = max(self.peak, sum(self.held.values()))

    def free(self, holder: str) -> None:
        self.held.pop(holder, None)


class FakeEngines:
    def __init__(self, ledger: Ledger, calls: list):
        self.ledger, self.calls = ledger, calls
        for part, nbytes in ENGINE.items():
            ledger.allocate(f"engine {part}", nbytes)

    def sleep(self) -> None:
        self.calls.append("sleep")
        for part in ENGINE:
            self.ledger.free(f"engine {part}")

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        self.calls.append(f"wake_up {','.join(tags or ENGINE)}")
        for part in tags or ENGINE:
            self.ledger.allocate(f"engine {part}", ENGINE[part])


class FakeLearner:
    """Weights stay on the GPU; optimizer state moves; training leaves its activations in the allocator cache."""

    def __init__(self, ledger: Ledger, calls: list):
        self.ledger, self.calls = ledger, calls
        ledger.allocate("learner weights", LEARNER_WEIGHTS)

    def reload_states(self) -> None:
        self.calls.append("reload_states")
        self.ledger.allocate("learner optimizer", OPTIMIZER)

    def train(self) -> None:
        self.calls.append("train")
        self.ledger.allocate("learner cache", TRAINING_CACHE)

    def offload_states(self) -> None:
        self.calls.append("offload_states")
        self.ledger.free("learner optimizer")
        self.ledger.free("learner cache")  # empty_cache

    def sync(self) -> None:
        self.calls.append("sync")
        self.ledger.allocate("sync bucket", GIB)
        self.ledger.free("sync bucket")


def iteration(schedule: ColocationSchedule, learner: FakeLearner, engines: FakeEngines) -> None:
    with schedule.training():
        learner.train()
    learner.sync()
    schedule.before_generating()
    engines.calls.append("generate")


def test_the_schedule_keeps_a_shared_gpu_within_its_memory_over_several_iterations():
    ledger, calls = Ledger(CAPACITY), []
    engines, learner = FakeEngines(ledger, calls), FakeLearner(ledger, calls)
    schedule = ColocationSchedule(engines, learner)
    for _ in range(3):
        iteration(schedule, learner, engines)
    assert calls[:7] == ["sleep", "reload_states", "train", "offload_states", f"wake_up {WEIGHTS}", "sync",
                         f"wake_up {KV_CACHE}"]
    assert ledger.peak <= CAPACITY
    # generating: the engine whole, the learner its weights only
    assert ledger.held == {"engine weights": ENGINE[WEIGHTS], "engine kv_cache": ENGINE[KV_CACHE],
                           "learner weights": LEARNER_WEIGHTS}


def test_waking_everything_while_the_learner_still_holds_its_training_memory_would_not_fit():
    """The order the schedule replaces: the same ledger refuses it, so the test above can fail."""
    ledger, calls = Ledger(CAPACITY), []
    engines, learner = FakeEngines(ledger, calls), FakeLearner(ledger, calls)
    engines.sleep()
    learner.reload_states()
    learner.train()
    with pytest.raises(OutOfMemory, match="engine"):
        engines.wake_up()


def test_the_engines_wake_even_when_training_fails():
    ledger, calls = Ledger(CAPACITY), []
    engines, learner = FakeEngines(ledger, calls), FakeLearner(ledger, calls)
    schedule = ColocationSchedule(engines, learner)
    with pytest.raises(RuntimeError, match="step failed"):
        with schedule.training():
            raise RuntimeError("step failed")
    schedule.before_generating()
    assert calls == ["sleep", "reload_states", "offload_states", f"wake_up {WEIGHTS}", f"wake_up {KV_CACHE}"]
    schedule.before_generating()  # nothing asleep any more: no second wake-up
    assert calls[-1] == f"wake_up {KV_CACHE}" and len(calls) == 5
