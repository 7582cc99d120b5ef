"""The registry: every configured kind has a builder, builds validate first (errors name the key), combined builds
its components recursively, and uses_accelerator says which configs load a network."""

from __future__ import annotations

import pytest

from reward import registry
from reward.base import RewardQuery, RewardResult
from reward.config import KINDS, MODEL_KINDS, RewardComponent, RewardConfig
from reward.registry import build_reward_model, uses_accelerator
from rlhf_loop.common.errors import UserError

QUERIES = [RewardQuery([{"role": "user", "content": "say hi"}], ["hi", "hello there", ""], {"bonus": 1.0}),
           RewardQuery([{"role": "user", "content": "count"}], ["one two", "x"], {"bonus": -2.0})]


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "user_code" / "scoring.py"
    path.parent.mkdir()
    path.write_text("def words(messages, response, meta):\n"
                    "    return len(response.split()) + meta['bonus']\n")
    return path


def words(response: str, meta: dict) -> float:
    return len(response.split()) + meta["bonus"]


def function_config(reference: str) -> RewardConfig:
    return RewardConfig(kind="function", function=reference)


def test_every_kind_has_a_builder_and_every_builder_a_kind():
    assert set(registry._BUILDERS) == set(KINDS)
    assert MODEL_KINDS <= set(KINDS)


def test_a_function_kind_builds_from_a_file_and_scores(rewards_file):
    model = build_reward_model(function_config(f"{rewards_file}:words"), "cpu")
    results = model.score(QUERIES)
    assert [r.scores for r in results] == [[words(t, q.meta) for t in q.responses] for q in QUERIES]
    assert model.objectives == []


class FakeMultiObjective:
    """Stands in for a model kind: the registry must pass its config, device and key, and name its objectives."""

    objectives = ["helpful", "safe"]

    def __init__(self, cfg, device, key):
        self.cfg, self.device, self.key = cfg, device, key

    def score(self, queries):
        return [RewardResult([float(len(r)) for r in q.responses],
                             {"helpful": [1.0] * len(q.responses), "safe": [-1.0] * len(q.responses)})
                for q in queries]


def test_combined_builds_its_components_and_names_their_objectives(rewards_file, monkeypatch):
    built = []

    def fake_builder(cfg, device, key):
        built.append(FakeMultiObjective(cfg, device, key))
        return built[-1]

    monkeypatch.setitem(registry._BUILDERS, "armorm", fake_builder)
    inner = RewardConfig(kind="combined", components=[
        RewardComponent(name="a", reward=function_config(f"{rewards_file}:words")),
        RewardComponent(name="b", weight=3.0, reward=function_config(f"{rewards_file}:words")),
    ])
    cfg = RewardConfig(kind="combined", components=[
        RewardComponent(name="rm", weight=0.5, reward=RewardConfig(kind="armorm", model_path="some/armorm")),
        RewardComponent(name="rules", reward=inner),
    ])
    model = build_reward_model(cfg, "cuda:1", key="judge")

    (fake,) = built
    assert (fake.cfg.model_path, fake.device, fake.key) == ("some/armorm", "cuda:1", "judge.components[0].reward")
    assert model.objectives == ["rm", "rm/helpful", "rm/safe", "rules", "rules/a", "rules/b"]
    results = model.score(QUERIES)
    for query, result in zip(QUERIES, results, strict=True):
        assert set(result.objectives) == set(model.objectives)
        lengths = [float(len(t)) for t in query.responses]
        rules = [(1.0 + 3.0) * words(t, query.meta) for t in query.responses]
        assert result.objectives["rm"] == lengths
        assert result.objectives["rules"] == pytest.approx(rules)
        assert result.objectives["rules/b"] == pytest.approx([words(t, query.meta) for t in query.responses])
        assert result.scores == pytest.approx([0.5 * x + y for x, y in zip(lengths, rules, strict=True)])


@pytest.mark.parametrize("cfg, key, message", [
    (RewardConfig(kind="nope"), "reward", r"reward\.kind 'nope' is unknown"),
    (RewardConfig(kind="function", function=None), "reward", r"reward\.function must be"),
    (RewardConfig(kind="bradley_terry"), "judge", r"judge\.model_path is required"),
    (RewardConfig(kind="function", function="x.py:f", batch_size=0), "reward", r"reward\.batch_size must be >= 1"),
    (RewardConfig(kind="combined"), "reward", r"reward\.components is empty"),
    (RewardConfig(kind="combined", components=[RewardComponent(name="f", reward=RewardConfig(kind="bad"))]),
     "reward", r"reward\.components\[0\]\.reward\.kind 'bad' is unknown"),
])
def test_unknown_kinds_and_invalid_configs_name_the_key(cfg, key, message, monkeypatch):
    for kind in KINDS:  # validation comes first: no builder may run
        monkeypatch.setitem(registry._BUILDERS, kind, lambda *a: pytest.fail("built an invalid config"))
    with pytest.raises(UserError, match=message):
        build_reward_model(cfg, "cpu", key=key)


def test_a_function_reference_to_a_missing_attribute_names_the_key(rewards_file):
    with pytest.raises(UserError, match=r"reward\.function .*no 'nothing'"):
        build_reward_model(function_config(f"{rewards_file}:nothing"), "cpu")


def model_config(kind: str) -> RewardConfig:
    return RewardConfig(kind=kind, model_path="some/model")


@pytest.mark.parametrize("cfg, expected", [
    *[(model_config(kind), True) for kind in sorted(MODEL_KINDS)],
    (function_config("f.py:f"), False),
    (RewardConfig(kind="remote"), False),
    (RewardConfig(kind="combined", components=[RewardComponent(name="f", reward=function_config("f.py:f"))]), False),
    (RewardConfig(kind="combined", components=[RewardComponent(name="f", reward=function_config("f.py:f")),
                                               RewardComponent(name="m", reward=model_config("pairwise"))]), True),
    (RewardConfig(kind="combined", components=[RewardComponent(name="c", reward=RewardConfig(
        kind="combined", components=[RewardComponent(name="m", reward=model_config("bradley_terry"))]))]), True),
])
def test_uses_accelerator(cfg, expected):
    assert uses_accelerator(cfg) is expected
