"""kind function (user code from a file or a module) and kind combined (weighted, optionally z-scored)."""

from __future__ import annotations

import statistics
import sys
import textwrap

import pytest

from reward.base import RewardQuery
from reward.config import RewardComponent, RewardConfig
from reward.registry import build_reward_model
from rlhf_loop.common.errors import UserError

USER_REWARDS = textwrap.dedent("""
    import math

    def length(messages, response, meta):
        return len(response)

    def exact_match(messages, response, meta):
        return float(response.strip() == meta["answer"])

    def lengths_batched(messages, responses, metas):
        return [float(len(r)) for r in responses]

    def nan_for_bad(messages, response, meta):
        return math.nan if response == "bad" else 1.0

    def returns_text(messages, response, meta):
        return "good"

    def one_short(messages, responses, metas):
        return [1.0] * (len(responses) - 1)

    NOT_CALLABLE = 3
""")


@pytest.fixture
def rewards_file(tmp_path):
    """A reward file outside the package: using it needs no edit of ours."""
    path = tmp_path / "outside" / "my_rewards.py"
    path.parent.mkdir()
    path.write_text(USER_REWARDS)
    return path


def function_config(reference: str, **overrides) -> RewardConfig:
    return RewardConfig(kind="function", function=reference, **overrides)


QUERIES = [
    RewardQuery([{"role": "user", "content": "2+2?"}], ["4", " 4 ", "five"], meta={"answer": "4"}),
    RewardQuery([{"role": "user", "content": "3+3?"}], ["6", ""], meta={"answer": "6"}),
]


def test_function_from_a_file_path(rewards_file):
    model = build_reward_model(function_config(f"{rewards_file}:exact_match"), "cpu")
    assert [r.scores for r in model.score(QUERIES)] == [[1.0, 1.0, 0.0], [1.0, 0.0]]


def test_function_from_a_module_on_sys_path(rewards_file, monkeypatch):
    monkeypatch.syspath_prepend(str(rewards_file.parent))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    model = build_reward_model(function_config("my_rewards:length"), "cpu")
    assert [r.scores for r in model.score(QUERIES)] == [[1.0, 3.0, 4.0], [1.0, 0.0]]


def test_batched_function_sees_at_most_batch_size_samples(rewards_file):
    model = build_reward_model(function_config(f"{rewards_file}:lengths_batched", function_batched=True,
                                               batch_size=2), "cpu")
    calls = []
    inner = model.function
    model.function = lambda m, r, x: calls.append(len(r)) or inner(m, r, x)
    assert [r.scores for r in model.score(QUERIES)] == [[1.0, 3.0, 4.0], [1.0, 0.0]]
    assert calls == [2, 2, 1]


@pytest.mark.parametrize("attribute, error", [
    ("nan_for_bad", r"returned nan for query 0 response 1 \(prompt '2\+2\?', response 'bad'\)"),
    ("returns_text", r"returned str 'good' for query 0 response 0 .* it must return a float"),
])
def test_bad_values_name_the_sample(rewards_file, attribute, error):
    model = build_reward_model(function_config(f"{rewards_file}:{attribute}"), "cpu")
    with pytest.raises(UserError, match=error):
        model.score([RewardQuery([{"role": "user", "content": "2+2?"}], ["fine", "bad"])])


def test_batched_function_with_wrong_count(rewards_file):
    model = build_reward_model(function_config(f"{rewards_file}:one_short", function_batched=True), "cpu")
    with pytest.raises(UserError, match="returned 2 values for a batch of 3 samples"):
        model.score(QUERIES[:1])


@pytest.mark.parametrize("reference, error", [
    ("{dir}/missing.py:length", "does not exist"),
    ("{dir}/my_rewards.py:nope", "defines no 'nope'"),
    ("{dir}/my_rewards.py:NOT_CALLABLE", "is not callable"),
    ("no_such_module_xyz:length", "importing no_such_module_xyz failed: ModuleNotFoundError"),
    ("length", "must be 'file.py:name' or 'package.module:name'"),
])
def test_bad_references_fail_at_start_up(rewards_file, reference, error):
    with pytest.raises(UserError, match=error):
        build_reward_model(function_config(reference.format(dir=rewards_file.parent)), "cpu")


def combined_config(rewards_file, normalize: str) -> RewardConfig:
    return RewardConfig(kind="combined", normalize=normalize, components=[
        RewardComponent(name="correct", weight=2.0, reward=function_config(f"{rewards_file}:exact_match")),
        RewardComponent(name="length", weight=-0.5, reward=function_config(f"{rewards_file}:length")),
    ])


def test_combined_weighted_sum_and_objectives(rewards_file):
    model = build_reward_model(combined_config(rewards_file, "none"), "cpu")
    assert model.objectives == ["correct", "length"]
    first = model.score(QUERIES)[0]
    assert first.scores == [2.0 - 0.5, 2.0 - 1.5, 0.0 - 2.0]
    assert first.objectives == {"correct": [1.0, 1.0, 0.0], "length": [1.0, 3.0, 4.0]}


def test_combined_zscore_standardises_each_term_per_prompt(rewards_file):
    model = build_reward_model(combined_config(rewards_file, "zscore"), "cpu")
    results = model.score(QUERIES)

    def z(values):
        mean, spread = statistics.fmean(values), statistics.pstdev(values)
        return [(v - mean) / spread for v in values]

    expected = [2.0 * c - 0.5 * n for c, n in zip(z([1.0, 1.0, 0.0]), z([1.0, 3.0, 4.0]))]
    assert results[0].scores == pytest.approx(expected)
    assert sum(results[1].scores) == pytest.approx(0.0)  # standardised terms sum to zero over the K


def test_combined_nests_model_kinds_and_names_their_objectives(rewards_file, tiny_reward_dir):
    cfg = RewardConfig(kind="combined", components=[
        RewardComponent(name="rm", reward=RewardConfig(model_path=str(tiny_reward_dir))),
        RewardComponent(name="len", weight=0.0, reward=function_config(f"{rewards_file}:length")),
    ])
    model = build_reward_model(cfg, "cpu")
    alone = build_reward_model(RewardConfig(model_path=str(tiny_reward_dir)), "cpu").score(QUERIES)
    assert [r.scores for r in model.score(QUERIES)] == [r.scores for r in alone]


def test_combined_component_errors_name_their_key(rewards_file):
    cfg = RewardConfig(kind="combined", components=[
        RewardComponent(name="rm", reward=RewardConfig(kind="bradley_terry")),
    ])
    with pytest.raises(UserError, match=r"reward.components\[0\].reward.model_path is required"):
        build_reward_model(cfg, "cpu")
