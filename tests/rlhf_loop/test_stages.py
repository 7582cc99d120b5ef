"""Scoring for the loop: the length penalty is applied once, with the raw scores kept beside the penalised ones."""

from __future__ import annotations

import pytest

from reward.base import RewardResult
from rlhf_loop import records
from rlhf_loop.records import Prompt, Response, Rollout
from rlhf_loop.stages import score_rollouts


class FixedReward:
    def __init__(self, scores):
        self.scores = scores

    def score(self, queries):
        return [RewardResult(scores=list(self.scores)) for _ in queries]


def rollout(token_counts):
    responses = [Response(text=f"r{i}", token_ids=[7] * n, finish_reason="stop") for i, n in enumerate(token_counts)]
    return Rollout(Prompt(0, [{"role": "user", "content": "q"}], [1, 2]), responses)


def test_length_penalty_is_applied_once_and_the_raw_scores_are_kept():
    [scored] = score_rollouts(FixedReward([1.0, 1.0, 2.0]), [rollout([10, 40, 100])], length_penalty=0.01)
    assert scored.scores == pytest.approx([0.9, 0.6, 1.0])
    assert scored.raw_scores == [1.0, 1.0, 2.0]
    assert records.scored_from_json(records.to_json(scored)) == scored


def test_no_penalty_leaves_the_scores_as_the_model_gave_them():
    [scored] = score_rollouts(FixedReward([0.3, -0.2]), [rollout([5, 6])], length_penalty=0.0)
    assert scored.scores == scored.raw_scores == [0.3, -0.2]
    old = records.to_json(scored)
    del old["raw_scores"]  # a scores file written before raw scores were recorded
    assert records.scored_from_json(old).raw_scores == [0.3, -0.2]
