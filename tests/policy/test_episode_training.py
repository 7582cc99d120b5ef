"""DPO on whole episodes: the loss counts the policy's own tokens only (the loss mask), never the chat template's or
the environment's, checked against a plain per-token computation."""

from __future__ import annotations

import math

import pytest
import torch
from learner_fixtures import (  # noqa: F401 (restore_environment is an autouse fixture)
    encode_prompt,
    encode_response,
    policy_config,
    restore_environment,
    train_config,
)

from policy.learner import DPOLearner
from rlhf_loop.common.chat import assistant_turn, tokens_after_turn
from rlhf_loop.common.records import Episode, Pair, Response


def episode_response(tokenizer, prompt_messages, turns: list[str]) -> Response:
    """An episode of `turns` answers, each followed by the user's "Again." as the template renders it."""
    messages, token_ids, mask = [], [], []
    for number, text in enumerate(turns):
        sampled = encode_response(tokenizer, text)
        messages.append(assistant_turn(text))
        token_ids += sampled
        mask += [1] * len(sampled)
        if number < len(turns) - 1:
            reply = [{"role": "user", "content": "Again."}]
            following = tokens_after_turn(tokenizer, [*prompt_messages, *messages], reply, sampled)
            messages += reply
            token_ids += following
            mask += [0] * len(following)
    return Response(turns[-1], token_ids, "stop", Episode(messages, mask, len(turns), "done", 1.0))


def masked_log_prob(model, prompt: list[int], response: Response) -> float:
    """Unbatched, summed in Python over the tokens whose mask is 1."""
    with torch.no_grad():
        log_probs = model(torch.tensor([prompt + response.token_ids])).logits[0].log_softmax(-1)
    return sum(log_probs[len(prompt) + i - 1, token].item()
               for i, (token, counted) in enumerate(zip(response.token_ids, response.loss_mask)) if counted)


@pytest.mark.integration  # DeepSpeed
def test_dpo_on_episodes_counts_only_the_policys_tokens(tiny_tokenizer, tiny_policy_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pairs = []
    for index in range(4):
        messages = [{"role": "user", "content": f"Question {index}: name three fruits."}]
        chosen = episode_response(tiny_tokenizer, messages, ["dog", "Apples, bananas and cherries."])
        rejected = episode_response(tiny_tokenizer, messages, ["Blue.", "dog dog dog"])
        assert 0 in chosen.loss_mask and 0 in rejected.loss_mask
        pairs.append(Pair(index, messages, encode_prompt(tiny_tokenizer, messages[0]["content"]), chosen, rejected,
                          1.0, 0.0))
    train = train_config(micro_batch_size=2, gradient_accumulation_steps=2, epochs=3, max_prompt_length=64,
                         max_length=192)
    assert all(len(p.prompt_token_ids) <= 64 and len(p.prompt_token_ids) + len(p.chosen.token_ids) <= 192
               for p in pairs)  # nothing cut: the sums below take the whole sequences
    learner = DPOLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    assert learner.begin_iteration(1, pairs, reference_dir=None) == 3
    learner.train_steps(2)
    learner.export_hf(str(tmp_path / "policy"))
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    reference = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)

    ratios = [[masked_log_prob(model, pair.prompt_token_ids, response) for model in (policy, reference)]
              for pair in pairs for response in (pair.chosen, pair.rejected)]
    chosen = [train.beta * (p - r) for p, r in ratios[0::2]]
    rejected = [train.beta * (p - r) for p, r in ratios[1::2]]
    expected_loss = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected)) / len(pairs)

    kl = learner.log_ratios([p.prompt_token_ids for p in pairs], [p.chosen.token_ids for p in pairs],
                            [p.chosen.loss_mask for p in pairs])
    assert kl == pytest.approx([c / train.beta for c in chosen], rel=1e-4, abs=1e-6)
    unmasked = learner.log_ratios([p.prompt_token_ids for p in pairs], [p.chosen.token_ids for p in pairs])
    assert unmasked != pytest.approx(kl, rel=1e-3)  # the environment's tokens would have counted

    last = learner.train_steps(1)  # the whole batch, its statistics taken on the exported weights
    assert last.chosen_reward == pytest.approx(sum(chosen) / len(pairs), rel=1e-4, abs=1e-6)
    assert last.rejected_reward == pytest.approx(sum(rejected) / len(pairs), rel=1e-4, abs=1e-6)
    assert last.loss == pytest.approx(expected_loss, rel=1e-4)
