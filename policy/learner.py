"""The DPO learner: one data-parallel rank of a DeepSpeed engine that keeps the policy in memory across iterations.

    learner = DPOLearner(cfg.policy, cfg.train, device="cpu", seed=0)
    total = learner.begin_iteration(1, pairs, reference_dir=None)
    while step < total: stats = learner.train_steps(cfg.train.save_steps); learner.save_checkpoint(...)
    engines.update_weights(learner.named_weights())

The shared engine (model loading, optimizer step, checkpoints, export) is `policy.deepspeed_policy.DeepSpeedPolicy`; this module
adds the reference model, the pairs of an iteration and the DPO losses. The reference's log-probabilities of an
iteration's pairs are computed once, batched, when the iteration begins (the reference is fixed for the
iteration), so the reference model need not stay in memory while training (`train.free_reference`). Where the
reference is at hand, the loop hands the iteration's pairs in ahead, shard by shard while the engines still
generate (`prepare_pairs`), and begin_iteration computes only what is left (`policy.prepared_references`).
`policy.learner_group.LearnerGroup` runs one learner per rank in Ray actors; tests use a learner in-process.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from policy.batching import (
    WeightedMicroBatch,
    batch_schedule,
    margin_weights,
    rank_micro_batches,
    response_log_probs,
    token_fingerprint,
)
from policy.config import PolicyConfig, TrainConfig
from rlhf_loop.common.sequences import PromptHead, cut_pair, pad_pairs
from policy.deepspeed_policy import DeepSpeedPolicy, load_reference, same_path
from policy.learner_protocol import TrainStats
from policy.losses import LOSSES
from policy.optimization import OptimizationSpec, learning_rate_at
from policy.prepared_references import PreparedReferences
from policy.weight_sync import SyncGroup
from rlhf_loop.common.arithmetic import ceil_div
from rlhf_loop.common.records import Pair


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    reference_chosen: float = 0.0  # summed log ref(chosen | prompt); unused by a reference-free loss
    reference_rejected: float = 0.0
    weight: float = 1.0  # the pair's share of the loss (train.margin_weighting)
    # episodes: 1 per chosen / rejected token the loss counts (the policy's own turns); None: all of them
    chosen_mask: list[int] | None = None
    rejected_mask: list[int] | None = None


_STAT_FIELDS = ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward")


def _cut_mask(mask: list[int] | None, response: list[int]) -> list[int] | None:
    """An episode's loss mask cut as its tokens were (a response keeps its start)."""
    return None if mask is None else list(mask[:len(response)])


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
        self._loss_settings = train.loss_settings()
        self._policy = DeepSpeedPolicy(policy, OptimizationSpec.from_train(train), device, seed, rank, world_size,
                                    train.lora)
        self._reference_dir = policy.model_path
        self._reference = None  # the reference model while it is kept in memory; loaded when first needed
        self._keeps_reference = self._loss.uses_reference and not train.free_reference
        self._iteration: int | None = None
        self._step = 0  # optimizer steps of the iteration done
        self._first_step = 0  # where the pairs in hand start: 0, or a later block's first step (sync_every_steps)
        self._planned_steps: int | None = None  # the learning-rate schedule's length; None: the schedule's own
        self._data_fingerprint: str | None = None
        self._pairs: list[TokenizedPair] = []
        self._schedule: list[list[int]] = []
        self._prepared: PreparedReferences[TokenizedPair] | None = None  # from prepare_pairs, for begin_iteration
        self._prompt_head: PromptHead | None = None  # what a cut prompt keeps; from the tokenizer, when first needed

    # --- iterations -----------------------------------------------------------------------------------------------

    def begin_iteration(self, iteration: int, pairs: Sequence[Pair], reference_dir: str | None,
                        first_step: int = 0, planned_steps: int | None = None) -> int:
        """Take an iteration's pairs; returns the step at which they are used up: the iteration's number of
        optimizer steps.

        Continues from the loaded checkpoint's step when it belongs to this iteration; otherwise starts at step 0
        (and resets Adam if train.reset_optimizer_each_iteration). `reference_dir` replaces the reference model when
        it differs from the one loaded (reference: previous). The reference's log-probabilities of the pairs are
        computed here (but for those prepare_pairs computed ahead: the same numbers), so a resumed iteration gets
        exactly the numbers the interrupted one had.

        Semi-online (train.sync_every_steps), an iteration comes in blocks: `first_step` > 0 gives the pairs of the
        block that starts at that step, once the learner has trained up to it (the step and Adam go on), and
        `planned_steps` is the length of the iteration's one learning-rate schedule.
        """
        self._use_reference(reference_dir)
        tokenized = [self._tokenize(pair) for pair in pairs]
        data_fingerprint = token_fingerprint([[p.prompt, p.chosen, p.rejected] for p in tokenized])
        if iteration == self._iteration and first_step == self._first_step:
            if data_fingerprint != self._data_fingerprint:
                raise ValueError(
                    f"iteration {iteration} resumes from a checkpoint trained on other pairs; "
                    "resume with the iteration's original pairs.jsonl"
                )
        elif first_step > 0:
            if (iteration, first_step) != (self._iteration, self._step):
                raise ValueError(f"iteration {iteration}'s pairs from step {first_step} on came to a learner at step "
                                 f"{self._step} of iteration {self._iteration}; train the blocks before it first")
        else:
            self._step = 0
            if self._train.reset_optimizer_each_iteration:
                self._policy.reset_optimizer()
        self._iteration = iteration
        self._first_step = first_step
        self._planned_steps = planned_steps
        self._data_fingerprint = data_fingerprint
        weights = margin_weights([pair.chosen_score - pair.rejected_score for pair in pairs],
                                 self._train.margin_weighting)
        prepared, self._prepared = self._prepared, None
        if self._loss.uses_reference:
            ahead = prepared.reusable(iteration, self._reference_dir, tokenized) if prepared is not None else []
            references = ahead + self._reference_log_probs(tokenized[len(ahead):])  # from a block boundary on
        else:
            references = [(0.0, 0.0)] * len(pairs)
        self._pairs = [replace(pair, reference_chosen=chosen, reference_rejected=rejected, weight=weight)
                       for pair, (chosen, rejected), weight in zip(tokenized, references, weights, strict=True)]
        block_key = (first_step,) if first_step else ()  # a later block's own order; step 0 keeps the iteration's
        self._schedule = batch_schedule(len(tokenized), self._train.epochs, self._train.global_batch_size,
                                        seed_key=(self._seed, iteration, *block_key))
        return self._end_step

    def prepare_pairs(self, iteration: int, pairs: Sequence[Pair], reference_dir: str | None) -> None:
        """Ahead of begin_iteration, while the engines still generate: take the iteration's next pairs (in their
        order in the iteration) and compute the reference's log-probs of every whole block of micro_batch_size x
        world_size pairs taken so far; begin_iteration reuses them. Does nothing where that would cost more than it
        saves: a reference-free loss, or a reference loaded anew for each use (train.free_reference)."""
        if not self._loss.uses_reference or not self._reference_at_hand(reference_dir):
            return
        self._use_reference(reference_dir)
        if self._prepared is None or not self._prepared.is_for(iteration, self._reference_dir):
            block = self._train.micro_batch_size * self._policy.world_size
            self._prepared = PreparedReferences(iteration, self._reference_dir, block)
        due = self._prepared.add([self._tokenize(pair) for pair in pairs])
        self._prepared.computed(self._reference_log_probs(due))

    def _reference_at_hand(self, reference_dir: str | None) -> bool:
        """Whether the reference stays in memory once loaded, or is the policy itself with its adapters off."""
        directory = self._reference_dir if reference_dir is None else reference_dir
        policy = self._policy.policy_config
        return self._keeps_reference or (self._policy.lora and same_path(directory, policy.model_path))

    def _use_reference(self, reference_dir: str | None) -> None:
        """`reference_dir` replaces the reference when it differs from the one loaded; None keeps it."""
        if reference_dir is not None and not same_path(reference_dir, self._reference_dir):
            self._reference = None
            self._reference_dir = reference_dir

    def _tokenize(self, pair: Pair) -> TokenizedPair:
        prompt, chosen = self._cut(pair.prompt_token_ids, pair.chosen.token_ids)
        _, rejected = self._cut(pair.prompt_token_ids, pair.rejected.token_ids)
        return TokenizedPair(prompt, chosen, rejected, chosen_mask=_cut_mask(pair.chosen.loss_mask, chosen),
                             rejected_mask=_cut_mask(pair.rejected.loss_mask, rejected))

    def _cut(self, prompt: Sequence[int], response: Sequence[int]) -> tuple[list[int], list[int]]:
        """To train.max_prompt_length and train.max_length, keeping the prompt's BOS and system turn (the driver
        counts the cuts: pairs/truncated_prompt, pairs/truncated_response)."""
        if self._prompt_head is None:
            self._prompt_head = PromptHead.of(self._policy.tokenizer)
        return cut_pair(prompt, response, self._train.max_prompt_length, self._train.max_length,
                        self._prompt_head.length(prompt))

    def _reference_log_probs(self, pairs: Sequence[TokenizedPair]) -> list[tuple[float, float]]:
        """Per pair, the reference's summed log-probabilities of chosen and rejected. Each rank computes its share
        (every rank the same number of forward passes, which ZeRO-3's collectives need) and the ranks add theirs up."""
        if not pairs:
            return []
        rank, world_size, chunk = self._policy.rank, self._policy.world_size, self._train.micro_batch_size
        mine = list(range(rank, len(pairs), world_size))
        totals = torch.zeros(2, len(pairs), dtype=torch.float64)
        self._policy.engine.eval()
        with self._reference_model() as reference, torch.no_grad():
            for start in range(0, ceil_div(ceil_div(len(pairs), world_size), chunk) * chunk, chunk):
                indices = mine[start : start + chunk]
                log_probs, _ = self._log_probs(reference, [pairs[i] for i in indices or [0]])
                if indices:
                    totals[:, indices] = log_probs.double().cpu().view(2, -1)
        totals = self._policy.all_reduce_sum(totals)
        return list(zip(totals[0].tolist(), totals[1].tolist(), strict=True))

    @contextlib.contextmanager
    def _reference_model(self) -> Iterator[torch.nn.Module]:
        """The reference as a model to run: the policy with its adapters off (LoRA on pi_0: nothing to load), the
        copy kept in memory, or one loaded for the occasion and dropped after (free_reference, reference-free)."""
        policy = self._policy.policy_config
        if self._policy.lora and same_path(self._reference_dir, policy.model_path):
            with self._policy.adapters_disabled():
                yield self._policy.engine
            return
        reference = self._reference
        if reference is None:
            reference = load_reference(self._reference_dir, policy, self._policy.dtype, self._policy.device)
            if self._keeps_reference:
                self._reference = reference
        yield reference

    def _log_probs(self, model, pairs: Sequence[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probabilities and token counts of the chosen responses, then of the rejected ones."""
        sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
        return response_log_probs(model, pad_pairs(sequences, self._policy.pad_token_id, self._policy.device, masks))

    def train_steps(self, max_steps: int) -> TrainStats:
        """Run up to `max_steps` optimizer steps, stopping at the end of the iteration."""
        if self._iteration is None:
            raise ValueError("call begin_iteration before train_steps")
        end = min(self._step + max_steps, self._end_step)
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
        return TrainStats(step=self._step, total_steps=self._end_step, **mean_stats(per_step))

    @property
    def _end_step(self) -> int:
        """The step at which the pairs in hand are used up."""
        return self._first_step + len(self._schedule)

    def _train_one_step(self) -> dict[str, float]:
        learning_rate = learning_rate_at(self._step, self._planned_steps or self._end_step, self._policy.spec)
        global_batch = [self._pairs[index] for index in self._schedule[self._step - self._first_step]]
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
        """Per pair: the (weighted) loss, and the implicit rewards of chosen and rejected (see LossFn.pair_losses)."""
        policy_log_probs, lengths = self._log_probs(self._policy.engine, pairs)
        reference_log_probs = None
        if self._loss.uses_reference:
            values = [p.reference_chosen for p in pairs] + [p.reference_rejected for p in pairs]
            reference_log_probs = torch.tensor(values, dtype=policy_log_probs.dtype, device=policy_log_probs.device)
        losses, chosen_rewards, rejected_rewards = self._loss.pair_losses(
            policy_log_probs, reference_log_probs, lengths, self._loss_settings
        )
        weights = torch.tensor([p.weight for p in pairs], dtype=losses.dtype, device=losses.device)
        return losses * weights, chosen_rewards, rejected_rewards

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str) -> None:
        """Weights, Adam state, iteration, step, data fingerprint and RNG states, written atomically."""
        self._policy.save(
            directory,
            {"trainer": "dpo", "iteration": self._iteration, "step": self._step, "data": self._data_fingerprint,
             "first_step": self._first_step},
        )

    def load_checkpoint(self, directory: str) -> None:
        """Restore a checkpoint; the next begin_iteration of the same iteration continues from its step."""
        state = self._policy.load(directory, "dpo", "a DPO learner checkpoint")
        self._iteration = state["iteration"]
        self._step = state["step"]
        self._first_step = state.get("first_step", 0)  # absent from checkpoints written before semi-online
        self._data_fingerprint = state["data"]

    # --- weights out and inference --------------------------------------------------------------------------------

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Full weights on CPU under their HF names (vLLM's load_weights takes them as they are). Rank 0 gets them;
        under ZeRO-3 every rank must call it (the gather is collective) and the others get []."""
        return self._policy.named_weights()

    def broadcast_weights(self, group: SyncGroup | None, sync: int, bucket_bytes: int) -> None:
        """Send the weights to the rollout engines as sync number `sync` of `group` (rank 0's place in the sync
        group, None on the other ranks); under ZeRO-3 every rank must call it."""
        self._policy.broadcast_weights(group, sync, bucket_bytes)

    def offload_states(self) -> None:
        """cluster.colocate: training state off the GPU while the colocated engines generate (every rank)."""
        self._policy.offload_states()

    def reload_states(self) -> None:
        self._policy.reload_states()

    def export_hf(self, directory: str) -> None:
        """HF format, written atomically by rank 0; every rank must call it (it synchronises the ranks). With LoRA,
        the merged weights."""
        self._policy.export_hf(directory)

    def export_adapter(self, directory: str) -> None:
        """train.lora: the adapter alone, in peft's format; every rank must call it."""
        if not self._policy.lora:
            raise ValueError("export_adapter needs train.lora.enabled: this learner trains every weight")
        self._policy.export_adapter(directory)

    def greedy_generate(self, prompt_token_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        return self._policy.greedy_generate(prompt_token_ids, max_tokens)

    @torch.no_grad()
    def log_ratios(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]],
                   loss_masks: list[list[int] | None] | None = None) -> list[float]:
        """Per sample: sum over response tokens of log pi - log ref (a KL estimate when responses come from pi);
        of an episode, over the policy's tokens only (`loss_masks`). Sequences are truncated as in training. A
        learner that keeps no reference loads it for this and drops it."""
        train = self._train
        sequences = [self._cut(prompt, response)
                     for prompt, response in zip(prompt_token_ids, response_token_ids, strict=True)]
        masks = loss_masks if loss_masks is not None else [None] * len(sequences)
        chunk = 2 * train.micro_batch_size
        batches = [pad_pairs(sequences[start : start + chunk], self._policy.pad_token_id, self._policy.device,
                             masks[start : start + chunk])
                   for start in range(0, len(sequences), chunk)]
        self._policy.engine.eval()
        policy_log_probs = [response_log_probs(self._policy.engine, batch)[0] for batch in batches]
        with self._reference_model() as reference:
            reference_log_probs = [response_log_probs(reference, batch)[0] for batch in batches]
        return [ratio for p, r in zip(policy_log_probs, reference_log_probs, strict=True) for ratio in (p - r).tolist()]
