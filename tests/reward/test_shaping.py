"""reward.objective_weights and reward.length_penalty: the arithmetic, and the weights applied in the reward actor."""

from __future__ import annotations

import pytest

from reward.actor import _RewardActor
from reward.base import RewardQuery, RewardResult
from reward.config import RewardComponent, RewardConfig
from reward.shaping import length_penalized, objective_weights_problem, weigh_objectives
from rlhf_loop.common.errors import UserError


def test_objective_weights_replace_the_score_by_the_weighted_objectives():
    results = [RewardResult(scores=[9.0, 9.0], objectives={"a": [1.0, 2.0], "b": [10.0, -10.0], "c": [5.0, 5.0]})]
    weighted = weigh_objectives(results, {"a": 2.0, "b": 0.5})
    assert weighted[0].scores == [2 * 1.0 + 0.5 * 10.0, 2 * 2.0 + 0.5 * -10.0]
    assert weighted[0].objectives == results[0].objectives  # kept for the logs
    assert weigh_objectives(results, {}) == results


def test_unknown_objectives_are_named():
    assert objective_weights_problem({"a": 1.0}, ["a", "b"]) is None
    assert "['x']" in objective_weights_problem({"a": 1.0, "x": 1.0}, ["a", "b"])
    assert "not multi-objective" in objective_weights_problem({"x": 1.0}, [])


def test_length_penalty_subtracts_per_token():
    assert length_penalized([1.0, 1.0, 0.5], [10, 30, 0], 0.01) == pytest.approx([0.9, 0.7, 0.5])
    assert length_penalized([1.0], [100], 0.0) == [1.0]


def write_rewards(tmp_path):
    (tmp_path / "rewards.py").write_text(
        "def length(messages, response, meta):\n    return float(len(response))\n"
        "def has_x(messages, response, meta):\n    return float('x' in response)\n"
    )
    return lambda name: RewardComponent(name=name, reward=RewardConfig(kind="function",
                                                                       function=f"{tmp_path}/rewards.py:{name}"))


def test_the_reward_actor_aggregates_objectives_with_the_user_weights(tmp_path):
    component = write_rewards(tmp_path)
    cfg = RewardConfig(kind="combined", components=[component("length"), component("has_x")],
                       objective_weights={"length": -0.5, "has_x": 3.0})
    actor = _RewardActor()  # the class Ray runs, here in-process
    assert actor.start(cfg, "cpu") == ["length", "has_x"]
    [result] = actor.score([RewardQuery([{"role": "user", "content": "q"}], ["xx", "abcd"])])
    assert result.scores == [-0.5 * 2 + 3.0 * 1, -0.5 * 4 + 3.0 * 0]
    assert result.objectives == {"length": [2.0, 4.0], "has_x": [1.0, 0.0]}


def test_the_reward_actor_refuses_weights_for_objectives_it_does_not_have(tmp_path):
    component = write_rewards(tmp_path)
    cfg = RewardConfig(kind="combined", components=[component("length")], objective_weights={"helpful": 1.0})
    with pytest.raises(UserError, match=r"reward.objective_weights names \['helpful'\]"):
        _RewardActor().start(cfg, "cpu")
