"""The order in which colocated rollout engines and the learner hand a shared GPU to each other (cluster.colocate).

    schedule = ColocationSchedule(engines, learner)
    with schedule.training():      # engines asleep, learner state back on the GPU ... learner state offloaded after
        train()
    sync()                         # only the engines' weights are awake: the sync needs no KV cache
    schedule.before_generating()   # the KV cache comes back last, when the learner holds only its weights

Waking everything at once while the learner's allocator still caches its training memory is what runs out of memory
(vLLM's `wake_up` must re-allocate the KV cache it was started with); this order frees before it allocates. OpenRLHF
schedules its colocated PPO the same way. The engines are started before the learner wherever they share a GPU,
since vLLM sizes its KV cache from the memory it finds free while it profiles (rlhf_loop.cluster.roles).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

WEIGHTS, KV_CACHE = "weights", "kv_cache"  # vLLM's wake_up tags


class SleepingEngines(Protocol):
    def sleep(self) -> None:
        """Weights to host memory, KV cache dropped (vLLM sleep level 1)."""

    def wake_up(self, tags: Sequence[str]) -> None:
        """Bring back the named parts (vLLM `wake_up(tags=...)`)."""


class OffloadingLearner(Protocol):
    def reload_states(self) -> None:
        """Optimizer state (and whatever offload_states moved) back on the GPU."""

    def offload_states(self) -> None:
        """Optimizer state to host memory, and the allocator's cached blocks returned to the device."""


class ColocationSchedule:
    def __init__(self, engines: SleepingEngines, learner: OffloadingLearner):
        self.engines, self.learner = engines, learner
        self._asleep: set[str] = set()  # what the engines hold off the GPU now

    @contextmanager
    def training(self) -> Iterator[None]:
        """Engines asleep for the block; the learner's training state is on the GPU only within it."""
        self.engines.sleep()
        self._asleep = {WEIGHTS, KV_CACHE}
        self.learner.reload_states()
        try:
            yield
        finally:
            self.learner.offload_states()
            self.engines.wake_up([WEIGHTS])  # the sync loads into them; the KV cache waits for generation
            self._asleep.discard(WEIGHTS)

    def before_generating(self) -> None:
        """The KV cache back (a no-op when it is there)."""
        if KV_CACHE in self._asleep:
            self.engines.wake_up([KV_CACHE])
            self._asleep.discard(KV_CACHE)
