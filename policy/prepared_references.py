"""The reference's log-probabilities of an iteration's first pairs, computed ahead while the rollout engines still
generate (`DPOLearner.prepare_pairs`), for `DPOLearner.begin_iteration` to reuse.

Only whole blocks of `micro_batch_size * world_size` pairs are computed ahead: a block that starts at a multiple of
the block size is split over the ranks into exactly the micro-batches that one computation over all the pairs would
run, so the numbers are bit-identical whether or not anything was prepared (and a resumed iteration, which prepares
nothing, gets the same ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from policy.deepspeed_policy import same_path

Item = TypeVar("Item")


@dataclass
class PreparedReferences(Generic[Item]):
    """The pairs (tokenised) handed in so far for one iteration and reference, and the reference log-probs of
    their leading whole blocks."""

    iteration: int
    reference_dir: str
    block: int  # micro_batch_size * world_size pairs
    pairs: list[Item] = field(default_factory=list)
    log_probs: list[tuple[float, float]] = field(default_factory=list)  # of pairs[:len(log_probs)]

    def is_for(self, iteration: int, reference_dir: str) -> bool:
        return iteration == self.iteration and same_path(reference_dir, self.reference_dir)

    def add(self, pairs: Sequence[Item]) -> Sequence[Item]:
        """Take the next pairs; returns those whose log-probs are now due: the whole blocks not computed yet (the
        caller computes them and hands them to `computed`), the remainder waiting for the next pairs."""
        self.pairs += pairs
        end = len(self.pairs) // self.block * self.block
        return self.pairs[len(self.log_probs):end]

    def computed(self, log_probs: Sequence[tuple[float, float]]) -> None:
        self.log_probs += log_probs

    def reusable(self, iteration: int, reference_dir: str, pairs: Sequence[Item]) -> list[tuple[float, float]]:
        """The log-probs computed ahead for the leading pairs of `pairs`, when they were computed for this iteration
        and reference from these same pairs; else none."""
        done = len(self.log_probs)
        if not self.is_for(iteration, reference_dir) or list(pairs[:done]) != self.pairs[:done]:
            return []
        return list(self.log_probs)
