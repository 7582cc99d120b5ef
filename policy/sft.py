"""SFT warm start: teach pi_0 the final assistant turn of chat conversations before the first DPO iteration.

    run_sft(cfg.policy, cfg.sft, conversations, out_dir)          # in-process: train, then export HF

The loop runs `SFTLearner` in a Ray actor instead, with `save_steps` steps as its unit of work:
    learner.begin(examples); while step < total: learner.train_steps(sft.save_steps); learner.save_checkpoint(...)
It shares the DeepSpeed engine, checkpoints and export with the DPO learner (`policy.deepspeed_policy.DeepSpeedPolicy`).
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
    rank_micro_batches,
    response_log_probs,
    token_fingerprint,
)
from policy.config import PolicyConfig, SFTConfig
from rlhf_loop.common.sequences import PromptHead, cut_pair, pad_pairs
from policy.deepspeed_policy import DeepSpeedPolicy
from policy.optimization import OptimizationSpec, learning_rate_at
from rlhf_loop.common.chat import prompt_and_last_turn
from rlhf_loop.common.records import Messages


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: the model learns `response_token_ids` given `prompt_token_ids`."""

    prompt_token_ids: list[int]
    response_token_ids: list[int]


@dataclass(frozen=True)
class SFTStats:
    """Averages over the optimizer steps of one `train_steps` call (NaN when it ran none)."""

    step: int
    total_steps: int
    loss: float  # mean negative log-likelihood per response token
    learning_rate: float


def example_from_messages(tokenizer, messages: Messages) -> SFTExample:
    """A conversation ending with an assistant turn, rendered with the chat template; only that turn is trained on
    (found by the template's assistant mask where it has one, see `rlhf_loop.common.chat.prompt_and_last_turn`)."""
    if not messages or messages[-1]["role"] != "assistant":
        roles = [message["role"] for message in messages]
        raise ValueError(f"an SFT conversation must end with an assistant turn; got roles {roles}")
    return SFTExample(*prompt_and_last_turn(tokenizer, messages))


def to_examples(tokenizer, examples: Sequence[SFTExample | Messages]) -> list[SFTExample]:
    return [e if isinstance(e, SFTExample) else example_from_messages(tokenizer, e) for e in examples]


class SFTLearner:
    """Negative log-likelihood on response tokens (prompts masked), with exact resume from its checkpoints."""

    def __init__(self, policy: PolicyConfig, sft: SFTConfig, device: str, seed: int):
        self._sft = sft
        self._seed = seed
        self._policy = DeepSpeedPolicy(policy, OptimizationSpec.from_sft(sft), device, seed, rank=0, world_size=1)
        self._examples: list[SFTExample] = []
        self._schedule: list[list[int]] = []
        self._step = 0
        self._data_fingerprint: str | None = None
        self._prompt_head: PromptHead | None = None  # what a cut prompt keeps; from the tokenizer, when first needed

    def _cut(self, example: SFTExample) -> tuple[list[int], list[int]]:
        """To sft.max_prompt_length and sft.max_length, keeping the prompt's BOS and system turn."""
        if self._prompt_head is None:
            self._prompt_head = PromptHead.of(self._policy.tokenizer)
        return cut_pair(example.prompt_token_ids, example.response_token_ids, self._sft.max_prompt_length,
                        self._sft.max_length, self._prompt_head.length(example.prompt_token_ids))

    def begin(self, examples: Sequence[SFTExample | Messages]) -> int:
        """Take the training examples (token ids, or conversations to render); returns the number of optimizer
        steps. After load_checkpoint, continues from the checkpoint's step (the examples must be the same)."""
        sft = self._sft
        truncated = [SFTExample(*self._cut(e)) for e in to_examples(self._policy.tokenizer, examples)]
        data_fingerprint = token_fingerprint([[e.prompt_token_ids, e.response_token_ids] for e in truncated])
        if self._data_fingerprint not in (None, data_fingerprint):
            raise ValueError("the SFT checkpoint was trained on other examples; resume with the original dataset")
        self._data_fingerprint = data_fingerprint
        self._examples = truncated
        self._schedule = batch_schedule(len(truncated), sft.epochs, sft.micro_batch_size, seed_key=(self._seed,))
        return len(self._schedule)

    def train_steps(self, max_steps: int) -> SFTStats:
        """Run up to `max_steps` optimizer steps, stopping at the end of training."""
        end = min(self._step + max_steps, len(self._schedule))
        losses, learning_rates = [], []
        # In an actor (no terminal) the driver's bar shows progress; in-process (toy asset builds) this one does.
        with tqdm(total=end - self._step, desc="SFT", leave=False, disable=not sys.stderr.isatty()) as progress:
            while self._step < end:
                learning_rate = learning_rate_at(self._step, len(self._schedule), self._policy.spec)
                losses.append(self._train_one_step(learning_rate))
                learning_rates.append(learning_rate)
                self._step += 1
                progress.update()
        return SFTStats(
            step=self._step,
            total_steps=len(self._schedule),
            loss=float(np.mean(losses)) if losses else math.nan,
            learning_rate=float(np.mean(learning_rates)) if learning_rates else math.nan,
        )

    def _train_one_step(self, learning_rate: float) -> float:
        batch = [self._examples[index] for index in self._schedule[self._step]]
        response_tokens = sum(len(e.response_token_ids) for e in batch)
        micro_batches = rank_micro_batches(batch, rank=0, world_size=1, micro_batch_size=self._sft.micro_batch_size)
        summed_nll = []

        def loss_of(micro_batch: WeightedMicroBatch) -> torch.Tensor:
            padded = pad_pairs(
                [(e.prompt_token_ids, e.response_token_ids) for e, _ in micro_batch],
                self._policy.pad_token_id,
                self._policy.device,
            )
            log_probs, _ = response_log_probs(self._policy.engine, padded, every_position=True)
            nll = -log_probs.sum()
            summed_nll.append(nll.item())
            return nll / max(1, response_tokens)  # token-level mean over the whole batch

        self._policy.optimizer_step(micro_batches, loss_of, learning_rate)
        return sum(summed_nll) / max(1, response_tokens)

    def save_checkpoint(self, directory: str) -> None:
        self._policy.save(directory, {"trainer": "sft", "step": self._step, "data": self._data_fingerprint})

    def load_checkpoint(self, directory: str) -> None:
        """Restore a checkpoint; call begin with the same examples next."""
        state = self._policy.load(directory, "sft", "an SFT checkpoint")
        self._step = state["step"]
        self._data_fingerprint = state["data"]

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        return self._policy.named_weights()

    def export_hf(self, directory: str) -> None:
        self._policy.export_hf(directory)

    @torch.no_grad()
    def mean_nll(self, examples: Sequence[SFTExample | Messages]) -> float:
        """Mean negative log-likelihood per response token of `examples` under the current weights."""
        sft = self._sft
        examples = to_examples(self._policy.tokenizer, examples)
        sequences = [self._cut(e) for e in examples]
        self._policy.engine.eval()
        total_log_prob, total_tokens = 0.0, 0
        for start in range(0, len(sequences), sft.micro_batch_size):
            padded = pad_pairs(sequences[start : start + sft.micro_batch_size], self._policy.pad_token_id,
                               self._policy.device)
            log_probs, lengths = response_log_probs(self._policy.engine, padded, every_position=True)
            total_log_prob += log_probs.sum().item()
            total_tokens += int(lengths.sum())
        return -total_log_prob / max(1, total_tokens)


def run_sft(
    policy: PolicyConfig,
    sft: SFTConfig,
    examples: Sequence[SFTExample | Messages],
    out_dir: str,
    device: str = "cpu",
    seed: int = 0,
) -> SFTStats:
    """Train in this process and export the result to `out_dir` in HF format; returns the training averages."""
    learner = SFTLearner(policy, sft, device, seed)
    total_steps = learner.begin(examples)
    stats = learner.train_steps(total_steps)
    learner.export_hf(out_dir)
    return stats
