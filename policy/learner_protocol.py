"""The learner seam: what the loop asks of a DPO learner (`Learner`) and what it reports (`TrainStats`).

`policy.learner_group.LearnerGroup` implements it over Ray actors, one `policy.learner.DPOLearner` per rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rlhf_loop.common.records import Pair


@dataclass(frozen=True)
class TrainStats:
    """Averages over the optimizer steps of one `train_steps` call (NaN when it ran none)."""

    step: int  # optimizer steps of this iteration done so far
    total_steps: int  # optimizer steps of this iteration
    loss: float
    reward_accuracy: float  # share of pairs whose implicit reward beta * (log pi - log ref) ranks chosen first
    # (SimPO, reference-free: beta * the mean log pi over response tokens)
    margin: float  # mean of chosen reward - rejected reward
    chosen_reward: float
    rejected_reward: float
    learning_rate: float


class Learner(Protocol):
    """A DPO learner that keeps the policy in memory from iteration to iteration."""

    def begin_iteration(self, iteration: int, pairs: Sequence[Pair], reference_dir: str | None,
                        first_step: int = 0, planned_steps: int | None = None) -> int:
        """Take an iteration's pairs (against the reference policy in `reference_dir`); returns its optimizer steps.
        Semi-online (train.sync_every_steps): the pairs of the block starting at `first_step`, trained on from there,
        under one learning-rate schedule of `planned_steps`; returns the step at which they are used up."""
        ...

    def prepare_pairs(self, iteration: int, pairs: Sequence[Pair], reference_dir: str | None) -> None:
        """Optional work ahead of `begin_iteration`, not waited for: the iteration's next pairs, in order (the
        reference's log-probs of those, where it is at hand); begin_iteration gives the same result either way."""
        ...

    def train_steps(self, max_steps: int) -> TrainStats:
        """Run up to `max_steps` optimizer steps of the current iteration."""
        ...

    def save_checkpoint(self, directory: str) -> None: ...

    def load_checkpoint(self, directory: str) -> None: ...

    def export_hf(self, directory: str) -> None:
        """The current policy in Hugging Face format (weights, config, tokenizer), written atomically."""
        ...

    def export_adapter(self, directory: str) -> None:
        """train.lora: the adapter alone, in peft's format, written atomically."""
        ...

    def weights_ref(self) -> Any:
        """A handle to the current weights that the rollout side's `update_weights` takes (a Ray object reference
        to [(HF name, CPU tensor)]), made without copying them through the caller (rollout.weight_sync:
        object_store)."""
        ...

    def weight_sync_address(self) -> tuple[str, int]:
        """rollout.weight_sync collective: where the store of the learner's weight broadcasts listens."""
        ...

    def start_weight_broadcast(self, spec: Any, bucket_bytes: int) -> list[Any]:
        """Start broadcasting the weights as `spec` (a `policy.weight_sync.SyncSpec`) says, without waiting: returns
        a Ray object reference per learner rank taking part, which the rollout group waits for beside the engines'
        (so that it sees at once any rank of the sync that fails)."""
        ...

    def offload_states(self) -> None:
        """cluster.colocate: the optimizer state to host memory and the allocator's cache emptied, while the
        colocated engines generate (`policy.colocation`)."""
        ...

    def reload_states(self) -> None:
        """The optimizer state back on the device, before training."""
        ...

    def log_ratios(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]],
                   loss_masks: list[list[int] | None] | None = None) -> list[float]:
        """Per sample: sum over response tokens of log pi - log ref (of an episode, over its `loss_masks` 1s)."""
        ...

    def placement(self) -> list[dict[str, Any]]:
        """Where each rank runs: Ray node id, address and process id."""
        ...
