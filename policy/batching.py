"""Training data as the learners consume it: response log-probabilities, a deterministic batch order, and each rank's
share of a global batch (cutting and padding are rlhf_loop.common.sequences', shared with the reward models)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from rlhf_loop.common.arithmetic import ceil_div
from rlhf_loop.common.sequences import PairBatch

Item = TypeVar("Item")
WeightedMicroBatch = list[tuple[Any, float]]


def response_log_probs(model: Callable[..., Any], batch: PairBatch, every_position: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its response tokens, and how many there are.

    The vocabulary projection runs only over the span of positions that predict a response token somewhere in the
    batch (`logits_to_keep`, after cutting the input at the last such position): with a 49,152-token vocabulary it
    is most of a step at prompt and padding positions otherwise. `every_position` projects at every position: the
    same numbers up to float rounding, kept for the SFT warm start, whose rounding the toy task's calibration depends
    on (see docs/performance.md, "Learner")."""
    predicts_response = batch.response_mask[:, 1:]  # logits at position p score token p + 1
    positions = predicts_response.any(0).nonzero().flatten()
    if every_position or positions.numel() == 0:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1]
        first = 0
    else:
        first, last = int(positions[0]), int(positions[-1])
        logits = model(input_ids=batch.input_ids[:, : last + 1], attention_mask=batch.attention_mask[:, : last + 1],
                       use_cache=False, logits_to_keep=last + 1 - first).logits
    logits = logits.float()  # one cast (none for an fp32 model)
    targets = batch.input_ids[:, first + 1 : first + 1 + logits.shape[1]]
    token_log_probs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    mask = predicts_response[:, first : first + logits.shape[1]]
    return (token_log_probs * mask).sum(-1), predicts_response.sum(-1)


def batch_schedule(num_items: int, epochs: int, global_batch_size: int, seed_key: Sequence[int]) -> list[list[int]]:
    """Item indices of every optimizer step: one permutation per epoch, drawn from (seed_key, epoch), cut into
    global batches (the last one of an epoch may be smaller)."""
    steps = []
    for epoch in range(epochs):
        order = np.random.default_rng([*seed_key, epoch]).permutation(num_items).tolist()
        steps += [order[start : start + global_batch_size] for start in range(0, num_items, global_batch_size)]
    return steps


def rank_micro_batches(
    global_batch: Sequence[Item], rank: int, world_size: int, micro_batch_size: int
) -> list[list[tuple[Item, float]]]:
    """This rank's share of a global batch as micro batches of (item, weight).

    Every rank must run the same number of forward/backward passes (ZeRO's collectives run inside them), so a rank
    whose share is short of the others' is padded with weight-0 copies of the batch's first item.
    """
    share = ceil_div(len(global_batch), world_size)
    mine = [(item, 1.0) for item in global_batch[rank::world_size]]
    mine += [(global_batch[0], 0.0)] * (share - len(mine))
    return [mine[start : start + micro_batch_size] for start in range(0, share, micro_batch_size)]


def margin_weights(margins: Sequence[float], scheme: str) -> list[float]:
    """Each pair's share of the loss from its reward margin (chosen score - rejected score): none gives every pair 1;
    linear gives margin / mean margin, so the mean weight stays 1 and the learning rate keeps its meaning."""
    if scheme == "none":
        return [1.0] * len(margins)
    if scheme == "linear":
        mean = sum(margins) / len(margins) if margins else 0.0
        return [margin / mean for margin in margins] if mean > 0 else [1.0] * len(margins)
    raise ValueError(f"train.margin_weighting {scheme!r} is unknown; use none or linear")


def token_fingerprint(records: Sequence[Sequence[Sequence[int]]]) -> str:
    """A short hash of training data (token-id lists per record), so a resumed run can check it got the same data."""
    digest = hashlib.sha256()
    for record in records:
        for tokens in record:
            digest.update(len(tokens).to_bytes(8, "little"))
            digest.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]
