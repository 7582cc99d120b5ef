"""SFT warm start: only the final assistant turn is learned, NLL falls, checkpoints resume exactly, export loads."""

from __future__ import annotations

import pytest
import torch
from learner_fixtures import (  # noqa: F401 (restore_environment is an autouse fixture)
    assert_same_weights,
    policy_config,
    restore_environment,
)

from policy.sft import SFTExample, SFTLearner, example_from_messages, run_sft
from policy.config import SFTConfig

ANSWERS = ["Apples, bananas and cherries.", "One two three four five.", "The waves roll in and out.", "Blue and green."]


@pytest.fixture
def conversations(tiny_messages):
    return [messages + [{"role": "assistant", "content": answer}] for messages, answer in zip(tiny_messages, ANSWERS)]


def sft_config(**overrides) -> SFTConfig:
    settings = dict(learning_rate=3e-3, lr_schedule="constant", warmup_ratio=0.0, micro_batch_size=2, epochs=4,
                    max_length=64, max_prompt_length=48)
    return SFTConfig(**{**settings, **overrides})


def test_only_the_final_assistant_turn_is_the_response(tiny_tokenizer, conversations):
    example = example_from_messages(tiny_tokenizer, conversations[1])
    assert tiny_tokenizer.decode(example.response_token_ids) == ANSWERS[1] + "<|eot_id|>"
    rendered = tiny_tokenizer.apply_chat_template(conversations[1], tokenize=True, return_dict=False)
    assert example.prompt_token_ids + example.response_token_ids == rendered
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        example_from_messages(tiny_tokenizer, conversations[1][:-1])


def independent_nll(model_dir, examples: list[SFTExample]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for e in examples:
            log_probs = model(torch.tensor([e.prompt_token_ids + e.response_token_ids])).logits[0].log_softmax(-1)
            start = len(e.prompt_token_ids)
            total -= sum(log_probs[start + i - 1, t].item() for i, t in enumerate(e.response_token_ids))
            tokens += len(e.response_token_ids)
    return total / tokens


@pytest.mark.integration  # DeepSpeed
def test_run_sft_lowers_the_nll_of_the_responses_and_exports(tiny_tokenizer, tiny_policy_dir, conversations, tmp_path):
    examples = [example_from_messages(tiny_tokenizer, c) for c in conversations]
    stats = run_sft(policy_config(tiny_policy_dir), sft_config(), conversations, str(tmp_path / "sft"), seed=0)
    assert stats.step == stats.total_steps == 8  # 4 examples / micro batch 2 x 4 epochs
    before, after = independent_nll(tiny_policy_dir, examples), independent_nll(tmp_path / "sft", examples)
    assert after < 0.8 * before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


@pytest.mark.integration  # DeepSpeed
def test_sft_resumes_exactly_from_a_checkpoint(tiny_tokenizer, tiny_policy_dir, conversations, tmp_path):
    config = sft_config(lr_schedule="cosine", warmup_ratio=0.2, micro_batch_size=3, weight_decay=0.01)
    examples = [example_from_messages(tiny_tokenizer, c) for c in conversations]  # token ids are accepted too
    uninterrupted = SFTLearner(policy_config(tiny_policy_dir), config, device="cpu", seed=1)
    assert uninterrupted.begin(examples) == 8  # 2 steps per epoch (the second one partial)
    nll_before = uninterrupted.mean_nll(examples)
    uninterrupted.train_steps(3)
    uninterrupted.save_checkpoint(str(tmp_path / "sft_step_3"))
    expected = uninterrupted.train_steps(100)
    assert uninterrupted.mean_nll(examples) < nll_before
    expected_weights = uninterrupted.named_weights()
    del uninterrupted

    resumed = SFTLearner(policy_config(tiny_policy_dir), config, device="cpu", seed=1)
    resumed.load_checkpoint(str(tmp_path / "sft_step_3"))
    assert resumed.begin(conversations) == 8
    assert resumed.train_steps(100) == expected
    assert_same_weights(resumed.named_weights(), expected_weights)


@pytest.mark.integration  # DeepSpeed
def test_dpo_and_sft_checkpoints_are_not_interchangeable(tiny_tokenizer, tiny_policy_dir, conversations, tmp_path):
    from learner_fixtures import train_config

    from policy.learner import DPOLearner

    sft = SFTLearner(policy_config(tiny_policy_dir), sft_config(), device="cpu", seed=0)
    sft.begin(conversations)
    sft.save_checkpoint(str(tmp_path / "sft"))
    dpo = DPOLearner(policy_config(tiny_policy_dir), train_config(), device="cpu", seed=0)
    with pytest.raises(ValueError, match="not a DPO learner checkpoint"):
        dpo.load_checkpoint(str(tmp_path / "sft"))
