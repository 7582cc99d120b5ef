"""Shared fixtures: tiny local models built once per test session (no download, no GPU)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Apples, bananas and cherries are fruits.",
    "Hello! How are you today? I am fine, thank you. What is your favourite colour? Blue and green.",
    "Write a short poem about the sea. The waves roll in and out under the moon.",
    "Name three animals: cat, dog, horse. Count to five: one two three four five.",
] * 50


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlhf_loop.toy.tiny import build_tokenizer

    return build_tokenizer(TINY_CORPUS, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_policy_dir(tiny_tokenizer, tmp_path_factory):
    from rlhf_loop.toy.tiny import build_tiny_policy

    return build_tiny_policy(tiny_tokenizer, tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(scope="session")
def tiny_reward_dir(tiny_tokenizer, tmp_path_factory):
    from rlhf_loop.toy.tiny import build_tiny_reward_model

    return build_tiny_reward_model(tiny_tokenizer, tmp_path_factory.mktemp("tiny_reward"))


@pytest.fixture(scope="session")
def tiny_messages():
    return [
        [{"role": "user", "content": "Name three fruits."}],
        [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Count to five."}],
        [{"role": "user", "content": "Write a short poem about the sea."}],
        [{"role": "user", "content": "What is your favourite colour?"}],
    ]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for every test that starts actors (started here unless the session already has one)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
