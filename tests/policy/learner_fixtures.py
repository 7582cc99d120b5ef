"""Shared helpers for the learner tests: preference pairs on the tiny tokenizer, configs, exact-equality checks."""

from __future__ import annotations

import os
import random

import pytest
import torch

from policy.config import PolicyConfig, TrainConfig
from rlhf_loop.common.records import Pair, Response

GOOD_ANSWERS = ["Apples, bananas and cherries.", "One two three four five.", "The waves roll in and out."]
BAD_ANSWERS = ["Blue.", "I am fine, thank you. What is your favourite colour? Blue and green.", "dog dog dog"]


def encode_prompt(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def encode_response(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


@pytest.fixture(scope="module", autouse=True)
def restore_environment():
    """In-process learners set RANK, WORLD_SIZE, MASTER_PORT, DS_ACCELERATOR...: take them back after each module
    (autouse wherever this is imported), so that processes started later (Ray workers) do not inherit them.
    The torch.distributed group itself stays: DeepSpeed caches it and cannot join a new one in the same process."""
    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)


def make_pairs(tokenizer, count: int, seed: int = 0) -> list[Pair]:
    """Pairs whose chosen answers come from one small set and rejected ones from another, so DPO can learn them."""
    rng = random.Random(seed)
    pairs = []
    for index in range(count):
        prompt = f"Question {index}: name {rng.randint(2, 5)} things."
        chosen, rejected = rng.choice(GOOD_ANSWERS), rng.choice(BAD_ANSWERS)
        pairs.append(
            Pair(
                prompt_index=index,
                prompt_messages=[{"role": "user", "content": prompt}],
                prompt_token_ids=encode_prompt(tokenizer, prompt),
                chosen=Response(chosen, encode_response(tokenizer, chosen), "stop"),
                rejected=Response(rejected, encode_response(tokenizer, rejected), "stop"),
                chosen_score=1.0,
                rejected_score=0.0,
            )
        )
    return pairs


def policy_config(model_dir) -> PolicyConfig:
    return PolicyConfig(model_path=str(model_dir))


def train_config(**overrides) -> TrainConfig:
    """A learner that moves visibly in a few steps on the tiny model."""
    settings = dict(
        learning_rate=1e-3,
        lr_schedule="constant",
        warmup_ratio=0.0,
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        max_length=64,
        max_prompt_length=32,
        beta=0.1,
    )
    return TrainConfig(**{**settings, **overrides})


def assert_same_weights(a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]) -> None:
    assert [name for name, _ in a] == [name for name, _ in b]
    for (name, x), (_, y) in zip(a, b):
        assert torch.equal(x, y), f"{name} differs (max abs diff {(x - y).abs().max().item():.3g})"
