"""The DPO learner: one data-parallel rank of a DeepSpeed engine that keeps the policy in memory across iterations.

    learner = DPOLearner(cfg.policy, cfg.train, device="cpu", seed=0)
    total = learner.begin_iteration(1, pairs, reference_dir=None)
    while step < total: stats = learner.train_steps(cfg.train.save_steps); learner.save_checkpoint(...)
    engines.update_weights(learner.named_weights())

The shared engine (model loading, optimizer step, checkpoints, export) is `policy.engine.PolicyEngine`; this module
adds the reference model, the pairs of an iteration and the DPO losses. `policy.learner_group.LearnerGroup` runs one
learner per rank in Ray actors; tests use a learner in-process.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from policy.batching import (
    WeightedMicroBatch,
    batch_schedule,
    fingerprint,
    pad_batch,
    rank_micro_batches,
    response_log_probs,
    truncate,
)
from policy.config import PolicyConfig, TrainConfig
from policy.engine import PolicyEngine, load_reference, same_path
from policy.learning import TrainStats
from policy.losses import LOSSES
from policy.optimization import OptimizationSpec, learning_rate_at
from rlhf_loop.records import Pair


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


_STAT_FIELDS = ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward")


def mean_stats(per_step: Sequence[dict[str, float]]) -> dict[str, float]:
    names = (*_STAT_FIELDS, "learning_rate")
    return {name: float(np.mean([step[name] for step in per_step])) if per_step else math.nan for name in names}


class DPOLearner:
    """One rank of the DPO learner. The policy stays in memory from iteration to iteration."""

    def __init__(
        self, policy: PolicyConfig, train: TrainConfig, device: str, seed: int, rank: int = 0, world_size: int = 1
    ):
        if world_size != train.num_workers:
            raise ValueError(f"a learner of train.num_workers={train.num_workers} ranks was started with "
                             f"world_size {world_size}; start every rank with LearnerGroup")
        self._train = train
        self._seed = seed
        self._loss = LOSSES[train.loss_type]
        self._policy = PolicyEngine(policy, OptimizationSpec.from_train(train), device, seed, rank, world_size)
        self._reference_dir = policy.model_path
        self._reference = load_reference(policy.model_path, policy, self._policy.dtype, self._policy.device)
        self._iteration: int | None = None
        self._step = 0
        self._data_fingerprint: str | None = None
        self._pairs: list[TokenizedPair] = []
        self._schedule: list[list[int]] = []

    # --- iterations -----------------------------------------------------------------------------------------------

    def begin_iteration(self, iteration: int, pairs: Sequence[Pair], reference_dir: str | None) -> int:
        """Take an iteration's pairs; returns its number of optimizer steps.

        Continues from the loaded checkpoint's step when it belongs to this iteration; otherwise starts at step 0
        (and resets Adam if train.reset_optimizer_each_iteration). `reference_dir` replaces the reference model when
        it differs from the one loaded (reference: previous).
        """
        if reference_dir is not None and not same_path(reference_dir, self._reference_dir):
            policy = self._policy.policy_config
            self._reference = load_reference(reference_dir, policy, self._policy.dtype, self._policy.device)
            self._reference_dir = reference_dir
        tokenized = [self._tokenize(pair) for pair in pairs]
        data_fingerprint = fingerprint([[p.prompt, p.chosen, p.rejected] for p in tokenized])
        if iteration == self._iteration:
            if data_fingerprint != self._data_fingerprint:
                raise ValueError(
                    f"iteration {iteration} resumes from a checkpoint trained on other pairs; "
                    "resume with the iteration's original pairs.jsonl"
                )
        else:
            self._step = 0
            if self._train.reset_optimizer_each_iteration:
                self._policy.reset_optimizer()
        self._iteration = iteration
        self._data_fingerprint = data_fingerprint
        self._pairs = tokenized
        self._schedule = batch_schedule(
            len(tokenized), self._train.epochs, self._train.global_batch_size, seed_key=(self._seed, iteration)
        )
        return len(self._schedule)

    def _tokenize(self, pair: Pair) -> TokenizedPair:
        limits = (self._train.max_prompt_length, self._train.max_length)
        prompt, chosen = truncate(pair.prompt_token_ids, pair.chosen.token_ids, *limits)
        _, rejected = truncate(pair.prompt_token_ids, pair.rejected.token_ids, *limits)
        return TokenizedPair(prompt, chosen, rejected)

    def train_steps(self, max_steps: int) -> TrainStats:
        """Run up to `max_steps` optimizer steps, stopping at the end of the iteration."""
        if self._iteration is None:
            raise ValueError("call begin_iteration before train_steps")
        end = min(self._step + max_steps, len(self._schedule))
        per_step = []
        progress = tqdm(
            total=end - self._step, desc=f"DPO iteration {self._iteration}", leave=False,
            disable=self._policy.rank != 0 or not sys.stderr.isatty(),  # in an actor, the driver's bar shows progress
        )
        with progress:
            while self._step < end:
                per_step.append(self._train_one_step())
                self._step += 1
                progress.update()
        return TrainStats(step=self._step, total_steps=len(self._schedule), **mean_stats(per_step))

    def _train_one_step(self) -> dict[str, float]:
        learning_rate = learning_rate_at(self._step, len(self._schedule), self._policy.spec)
        global_batch = [self._pairs[index] for index in self._schedule[self._step]]
        micro_batches = rank_micro_batches(
            global_batch, self._policy.rank, self._policy.world_size, self._train.micro_batch_size
        )
        sums = torch.zeros(len(_STAT_FIELDS) + 1, dtype=torch.float64)  # each stat summed over pairs, then pairs

        def loss_of(micro_batch: WeightedMicroBatch) -> torch.Tensor:
            pairs = [pair for pair, _ in micro_batch]
            weights = torch.tensor([weight for _, weight in micro_batch], device=self._policy.device)
            losses, chosen_rewards, rejected_rewards = self._pair_losses(pairs)
            per_pair = torch.stack(
                [losses.detach(), (chosen_rewards > rejected_rewards).float(), chosen_rewards - rejected_rewards,
                 chosen_rewards, rejected_rewards, torch.ones_like(losses)]
            )
            sums.add_((per_pair * weights).sum(-1).double().cpu())
            return (losses * weights).sum() * self._policy.world_size / len(global_batch)

        self._policy.optimizer_step(micro_batches, loss_of, learning_rate)
        totals = self._policy.all_reduce_sum(sums)
        stats = {name: float(totals[i] / totals[-1]) for i, name in enumerate(_STAT_FIELDS)}
        return {**stats, "learning_rate": learning_rate}

    def _pair_losses(self, pairs: Sequence[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pair: the loss, and the implicit rewards beta * (log pi - log ref) of chosen and rejected."""
        sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        batch = pad_batch(sequences, self._policy.pad_token_id, self._policy.device)
        policy_log_probs, lengths = response_log_probs(self._policy.engine, batch)
        with torch.no_grad():
            reference_log_probs, _ = response_log_probs(self._reference, batch)
        log_ratios = policy_log_probs - reference_log_probs
        loss_inputs = log_ratios / lengths.clamp(min=1) if self._loss.average_log_probs else log_ratios
        chosen, rejected = loss_inputs.chunk(2)
        losses = self._loss(chosen, rejected, self._train.beta, self._train.label_smoothing)
        rewards = self._train.beta * log_ratios.detach()
        chosen_rewards, rejected_rewards = rewards.chunk(2)
        return losses, chosen_rewards, rejected_rewards

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str) -> None:
        """Weights, Adam state, iteration, step, data fingerprint and RNG states, written atomically."""
        self._policy.save(
            directory,
            {"trainer": "dpo", "iteration": self._iteration, "step": self._step, "data": self._data_fingerprint},
        )

    def load_checkpoint(self, directory: str) -> None:
        """Restore a checkpoint; the next begin_iteration of the same iteration continues from its step."""
        state = self._policy.load(directory)
        if state.get("trainer") != "dpo":
            raise ValueError(f"{directory} is not a DPO learner checkpoint (it was written by {state.get('trainer')})")
        self._iteration = state["iteration"]
        self._step = state["step"]
        self._data_fingerprint = state["data"]

    # --- weights out and inference --------------------------------------------------------------------------------

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Full weights on CPU under their HF names (vLLM's load_weights takes them as they are). Rank 0 gets them;
        under ZeRO-3 every rank must call it (the gather is collective) and the others get []."""
        return self._policy.named_weights()

    def export_hf(self, directory: str) -> None:
        """HF format, written atomically by rank 0; every rank must call it (it synchronises the ranks)."""
        self._policy.export_hf(directory)

    def greedy_generate(self, prompt_token_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        return self._policy.greedy_generate(prompt_token_ids, max_tokens)

    @torch.no_grad()
    def log_ratios(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]]) -> list[float]:
        """Per sample: sum over response tokens of log pi - log ref (a KL estimate when responses come from pi).
        Sequences are truncated as in training."""
        train = self._train
        sequences = [
            truncate(prompt, response, train.max_prompt_length, train.max_length)
            for prompt, response in zip(prompt_token_ids, response_token_ids, strict=True)
        ]
        self._policy.engine.eval()
        chunk = 2 * train.micro_batch_size
        ratios: list[float] = []
        for start in range(0, len(sequences), chunk):
            batch = pad_batch(sequences[start : start + chunk], self._policy.pad_token_id, self._policy.device)
            policy_log_probs, _ = response_log_probs(self._policy.engine, batch)
            reference_log_probs, _ = response_log_probs(self._reference, batch)
            ratios += (policy_log_probs - reference_log_probs).tolist()
        return ratios
