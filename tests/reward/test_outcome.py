"""Episodes scored: kind outcome reads the environment's outcome; pointwise kinds score the whole conversation
(its last assistant turn as the response); kind combined mixes them; kinds that compare against one shared prompt
refuse episodes with one line."""

from __future__ import annotations

import pytest

from reward.base import RewardQuery
from reward.config import RewardComponent, RewardConfig
from reward.groups import ungroup
from reward.registry import build_reward_model
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.records import Episode

PROMPT = [{"role": "user", "content": "Say apple."}]


def episode(*turns: str, outcome: float | None, final_reply: str | None = None) -> Episode:
    messages = []
    for number, turn in enumerate(turns):
        if number:
            messages.append({"role": "user", "content": "Again."})
        messages.append({"role": "assistant", "content": turn})
    if final_reply:
        messages.append({"role": "user", "content": final_reply})
    return Episode(messages, [1], len(turns), "done" if outcome == 1.0 else "max_turns", outcome)


@pytest.fixture
def query():
    episodes = [episode("apple", outcome=1.0, final_reply="Well done."), episode("dog", "cherry", outcome=0.0),
                episode("dog", "dog", "dog", outcome=None)]
    return RewardQuery(PROMPT, [e.messages[[m["role"] for m in e.messages].index("assistant")]["content"]
                                for e in episodes], {"answer": "apple"}, episodes)


def test_outcome_scores_are_the_environments(query):
    reward = build_reward_model(RewardConfig(kind="outcome", missing_outcome=-1.0), "cpu")
    assert reward.score([query])[0].scores == [1.0, 0.0, -1.0]


def test_outcome_refuses_single_turn_responses():
    reward = build_reward_model(RewardConfig(kind="outcome"), "cpu")
    with pytest.raises(UserError, match="kind outcome scores episodes.*set environment.factory"):
        reward.score([RewardQuery(PROMPT, ["apple"])])


def test_a_pointwise_scorer_sees_the_whole_conversation_up_to_the_last_assistant_turn(query):
    samples = ungroup([query])
    assert samples[0].messages == PROMPT and samples[0].response == "apple"  # the final reply is left out
    assert samples[1].messages == [*PROMPT, {"role": "assistant", "content": "dog"},
                                   {"role": "user", "content": "Again."}]
    assert samples[1].response == "cherry"
    assert len(samples[2].messages) == 5 and samples[2].response == "dog"


def test_combined_mixes_the_outcome_with_a_function_of_the_conversation(query, tmp_path):
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def turns(messages, response, meta):\n    return float(len(messages))\n")
    cfg = RewardConfig(kind="combined", components=[
        RewardComponent(name="outcome", weight=1.0, reward=RewardConfig(kind="outcome")),
        RewardComponent(name="length", weight=-0.1, reward=RewardConfig(kind="function", function=f"{rewards}:turns")),
    ])
    result = build_reward_model(cfg, "cpu").score([query])[0]
    assert result.objectives == {"outcome": [1.0, 0.0, 0.0], "length": [1.0, 3.0, 5.0]}
    assert result.scores == pytest.approx([0.9, -0.3, -0.5])


@pytest.mark.parametrize("kind", ["remote", "pairwise"])
def test_kinds_that_compare_against_one_prompt_refuse_episodes(query, kind):
    from reward.pairwise import PairwiseJudge
    from reward.remote import RemoteReward

    scorer = object.__new__(RemoteReward if kind == "remote" else PairwiseJudge)  # the check comes before any use
    with pytest.raises(UserError, match=f"reward kind {kind} scores single-turn responses"):
        scorer.score([query])
