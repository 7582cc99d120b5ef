"""The pairwise judge: answer-token probabilities, both orders averaged, all-pairs and tournament rankings."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from reward.base import RewardQuery
from reward.config import PairwiseConfig, RewardConfig
from reward.registry import build_reward_model
from rlhf_loop.common.errors import UserError


def judge_config(model_dir, **pairwise) -> RewardConfig:
    return RewardConfig(kind="pairwise", model_path=str(model_dir), batch_size=8,
                        pairwise=PairwiseConfig(**pairwise))


@pytest.fixture(scope="module")
def judge(tiny_policy_dir):
    return build_reward_model(judge_config(tiny_policy_dir), "cpu")


@pytest.fixture(scope="module")
def queries(tiny_messages):
    return [
        RewardQuery(tiny_messages[0], ["apple banana cherry", "no", "cat dog horse", ""]),
        RewardQuery(tiny_messages[1], ["one two three four five", "five four"]),
    ]


def p_a_unbatched(judge, ids: list[int]) -> float:
    with torch.inference_mode():
        logits = judge.model(torch.tensor([ids])).logits[0, -1, judge.answer_ids]
    return torch.softmax(logits.float(), dim=-1)[0].item()


def test_comparison_averages_both_orders_of_the_real_judge(judge, queries):
    messages, (a, b) = queries[1].messages, queries[1].responses
    expected = (p_a_unbatched(judge, judge.judge_prompt(messages, a, b))
                + 1 - p_a_unbatched(judge, judge.judge_prompt(messages, b, a))) / 2
    assert judge.score([queries[1]])[0].scores == pytest.approx([expected, 1 - expected], abs=1e-5)


def test_judge_prompt_follows_the_template(judge, queries):
    text = judge.tokenizer.decode(judge.judge_prompt(queries[1].messages, "AAA", "BBB"))
    assert "[CONTEXT] \n\n\n<turn> system\n You are brief.\n\n<turn> user\n Count to five." in text
    assert text.index("[RESPONSE A] AAA") < text.index("[RESPONSE B] BBB")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_all_pairs_scores_are_win_rates(judge, queries):
    for query, result in zip(queries, judge.score(queries)):
        k = len(query.responses)
        assert all(0 <= s <= 1 for s in result.scores)
        assert sum(result.scores) == pytest.approx(k / 2, abs=1e-5)  # P(i>j) + P(j>i) = 1 for every pair


def test_over_long_judge_inputs_fit_max_length(tiny_policy_dir, tiny_messages):
    judge = build_reward_model(dataclasses.replace(judge_config(tiny_policy_dir), max_length=96), "cpu")
    long_prompt = [{"role": "user", "content": "Count to five: one two three four five. " * 30}]
    ids = judge.judge_prompt(long_prompt, "apple " * 50, "banana " * 50)
    text = judge.tokenizer.decode(ids)
    assert len(ids) <= 96
    assert "[RESPONSE A] apple" in text and "[RESPONSE B] banana" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")  # the answer position survives


class RiggedJudge:
    """Stands in for the network: prefers longer responses, with a strong bias toward whatever is shown first."""

    def __init__(self, judge):
        self.judge, self.calls = judge, 0

    def __call__(self, prompts):
        self.calls += len(prompts)
        probabilities = []
        for ids in prompts:
            text = self.judge.tokenizer.decode(ids)
            a, b = re.search(r"\[RESPONSE A\] (.*) \[RESPONSE B\] (.*?)<\|eot_id\|>", text, re.S).groups()
            probabilities.append(1 / (1 + math.exp(-(len(a) - len(b)) / 4 - 1.5)))  # +1.5: position bias
        return probabilities


def test_position_bias_cancels_and_all_pairs_ranks_by_preference(judge, monkeypatch):
    rigged = RiggedJudge(judge)
    monkeypatch.setattr(judge, "_prob_a", rigged)
    responses = ["ab", "abcdefgh", "a", "abcd", "abcdefghijkl"]
    scores = judge.score([RewardQuery([{"role": "user", "content": "hi"}], responses)])[0].scores
    assert sorted(range(5), key=scores.__getitem__) == [2, 0, 3, 1, 4]
    assert rigged.calls == 2 * 10  # K(K-1)/2 comparisons, each in both orders
    # Equal responses tie exactly although the rigged judge always prefers the first shown.
    tied = judge.score([RewardQuery([{"role": "user", "content": "hi"}], ["same", "same"])])[0].scores
    assert tied == [0.5, 0.5]


def test_tournament_crowns_the_best_with_k_minus_1_comparisons(tiny_policy_dir, monkeypatch):
    judge = build_reward_model(judge_config(tiny_policy_dir, ranking="tournament"), "cpu")
    rigged = RiggedJudge(judge)
    monkeypatch.setattr(judge, "_prob_a", rigged)
    responses = ["ab", "abcdefgh", "a", "abcd", "abcdefghijkl"]
    scores = judge.score([RewardQuery([{"role": "user", "content": "hi"}], responses)])[0].scores
    assert rigged.calls == 2 * (len(responses) - 1)
    assert max(range(5), key=scores.__getitem__) == 4  # the longest wins the bracket
    # Round 0: (ab vs abcdefgh) and (a vs abcd) lose; their scores sit below every later round's.
    assert max(scores[0], scores[2]) < 1 <= min(scores[1], scores[3], scores[4])


def test_tournament_on_the_real_judge_gives_one_score_per_response(tiny_policy_dir, queries):
    judge = build_reward_model(judge_config(tiny_policy_dir, ranking="tournament"), "cpu")
    results = judge.score(queries)
    assert [len(r.scores) for r in results] == [4, 2]
    assert results[0].scores == judge.score(queries)[0].scores  # deterministic


def test_multi_token_answer_is_rejected_at_start_up(tiny_policy_dir):
    with pytest.raises(UserError, match="must each be a single token"):
        build_reward_model(judge_config(tiny_policy_dir, token_a="Response A is better"), "cpu")


def test_template_with_unknown_placeholder_is_rejected(tiny_policy_dir):
    template = "{context} {response_a} {response_b} {score}"
    with pytest.raises(UserError, match="placeholder other than"):
        build_reward_model(judge_config(tiny_policy_dir, template=template), "cpu")
