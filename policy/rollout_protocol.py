"""The rollout seam: an engine samples K responses per prompt and takes new weights in memory.

Weights arrive either as one list (`update_weights`, through Ray's object store) or over the learner's broadcast
(`receive_weights`, bucket by bucket). Two engines implement it: `policy.vllm_engine.VLLMEngine` (default) and
`policy.hf_engine.HFEngine` (fallback).
Each lives in its own Ray actor (`policy.rollout_group.RolloutGroup`), so the loop never imports vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from policy.weight_sync import SyncSpec
from rlhf_loop.common.records import Prompt, Rollout


@dataclass(frozen=True)
class Sampling:
    n: int  # responses per prompt
    temperature: float
    top_p: float
    max_tokens: int
    seed: int  # base seed; each prompt samples with derived_seed(seed, prompt.index)


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        """K = sampling.n responses for every prompt, in prompt order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (HF parameter names) in place, without restarting the engine."""
        ...

    def receive_weights(self, spec: SyncSpec, first_rank: int) -> None:
        """Load new weights as the learner broadcasts them (`policy.weight_sync`): the engine's workers take ranks
        first_rank, first_rank + 1, ... of the group `spec.session`, joined at its first sync and kept."""
        ...

    def release_weight_sync(self) -> None:
        """Leave the sync group now (the end of the run)."""
        ...

    def load_initial_weights(self) -> None:
        """pi_0's weights again, from where the engine was built from (a warm engine taken by a new run)."""
        ...
