"""RewardScorer: the reward model in a Ray actor, errors coming back as one-line UserErrors."""

from __future__ import annotations

import os
import signal

import pytest

from reward.base import RewardQuery
from reward.config import RewardConfig
from reward.registry import build_reward_model
from rlhf_loop.common.actor_calls import ActorTimeout
from rlhf_loop.common.errors import UserError

pytestmark = pytest.mark.integration  # starts Ray actors


def test_actor_scores_like_in_process(ray_local, tiny_reward_dir, tiny_messages):
    from reward.actor import RewardScorer

    cfg = RewardConfig(model_path=str(tiny_reward_dir), batch_size=3)
    queries = [RewardQuery(m, ["one two", "three", ""]) for m in tiny_messages]
    scorer = RewardScorer(cfg, "cpu")
    try:
        remote = scorer.score(queries)
        assert scorer.objectives == []
    finally:
        scorer.shutdown()
    local = build_reward_model(cfg, "cpu").score(queries)
    assert [r.scores for r in remote] == [r.scores for r in local]


def test_a_warm_reward_actor_taken_by_a_later_run_keeps_its_model(ray_local, tiny_reward_dir, tiny_messages):
    """cluster.keep_warm: the later scorer of that name takes the same process and scores as before, without building
    the model again."""
    from reward.actor import RewardScorer

    cfg = RewardConfig(model_path=str(tiny_reward_dir), batch_size=3)
    queries = [RewardQuery(m, ["one two", "three", ""]) for m in tiny_messages]
    earlier = RewardScorer(cfg, "cpu", name="warm-test-reward")
    try:
        model_id = ray_local.get(earlier._actor.__ray_call__.remote(lambda actor: id(actor.model)))
        scores = [r.scores for r in earlier.score(queries)]
        later = RewardScorer(cfg, "cpu", name="warm-test-reward")
        assert (earlier.reused, later.reused) == ([False], [True]) and later.placement() == earlier.placement()
        assert ray_local.get(later._actor.__ray_call__.remote(lambda actor: id(actor.model))) == model_id
        assert [r.scores for r in later.score(queries)] == scores
    finally:
        earlier.shutdown()


def test_bad_model_dir_fails_at_construction(ray_local, tmp_path):
    from reward.actor import RewardScorer

    with pytest.raises(UserError, match="is not a directory") as error:
        RewardScorer(RewardConfig(model_path=str(tmp_path / "missing")), "cpu")
    assert "\n" not in str(error.value)


def test_relative_function_file_and_nan_error_reach_the_driver(ray_local, tmp_path, monkeypatch, tiny_messages):
    from reward.actor import RewardScorer

    (tmp_path / "my_rewards.py").write_text(
        "def length(messages, response, meta):\n"
        "    return float('nan') if response == 'bad' else float(len(response))\n"
    )
    monkeypatch.chdir(tmp_path)
    scorer = RewardScorer(RewardConfig(kind="function", function="my_rewards.py:length"), "cpu")
    try:
        assert scorer.score([RewardQuery(tiny_messages[0], ["abc", ""])])[0].scores == [3.0, 0.0]
        with pytest.raises(UserError, match="returned nan for query 1 response 0"):
            scorer.score([RewardQuery(tiny_messages[0], ["ok"]), RewardQuery(tiny_messages[1], ["bad"])])
    finally:
        scorer.shutdown()


def test_a_killed_reward_actor_is_restarted_and_scores_the_batch_again(ray_local, tiny_reward_dir, tiny_messages):
    from reward.actor import RewardScorer

    queries = [RewardQuery(m, ["one two", "three", ""]) for m in tiny_messages]
    scorer = RewardScorer(RewardConfig(model_path=str(tiny_reward_dir), batch_size=3), "cpu", max_restarts=1)
    try:
        expected = scorer.score(queries)
        (first,) = scorer.placement()
        os.kill(first["pid"], signal.SIGKILL)
        assert [r.scores for r in scorer.score(queries)] == [r.scores for r in expected]
        assert scorer.restarts == 1 and scorer.placement()[0]["pid"] != first["pid"]
    finally:
        scorer.shutdown()


def test_a_hung_reward_actor_becomes_a_one_line_timeout(ray_local, tmp_path, tiny_messages):
    from reward.actor import RewardScorer

    (tmp_path / "hang.py").write_text("import time\n\ndef forever(messages, response, meta):\n"
                                      "    time.sleep(600)\n    return 0.0\n")
    scorer = RewardScorer(RewardConfig(kind="function", function=f"{tmp_path / 'hang.py'}:forever"), "cpu")
    scorer.timeout_s = 1.0  # after start-up, which a busy machine may slow beyond a second
    try:
        with pytest.raises(ActorTimeout, match="reward actor did not answer within 1 s during score") as error:
            scorer.score([RewardQuery(tiny_messages[0], ["a"])])
        assert "\n" not in str(error.value) and "reward.call_timeout_s" in str(error.value)
    finally:
        scorer.shutdown()
