"""The reward section's value checks, and the light-import rule."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from reward.config import KINDS, PairwiseConfig, RemoteConfig, RewardComponent, RewardConfig, reward_config_problems


def test_defaults_are_valid_for_a_classifier():
    assert reward_config_problems(RewardConfig(model_path="some/rm")) == []


def test_every_kind_is_a_config_change():
    configs = {
        "bradley_terry": RewardConfig(kind="bradley_terry", model_path="rm"),
        "armorm": RewardConfig(kind="armorm", model_path="rm", trust_remote_code=True),
        "pairwise": RewardConfig(kind="pairwise", model_path="judge"),
        "function": RewardConfig(kind="function", function="my.py:f"),
        "combined": RewardConfig(kind="combined", components=[
            RewardComponent(name="f", reward=RewardConfig(kind="function", function="pkg.mod:f"))]),
        "remote": RewardConfig(kind="remote", remote=RemoteConfig(url="http://127.0.0.1:8000")),
        "outcome": RewardConfig(kind="outcome"),
    }
    assert set(configs) == set(KINDS)
    for kind, cfg in configs.items():
        assert reward_config_problems(cfg) == [], kind


@pytest.mark.parametrize("cfg, message", [
    (RewardConfig(kind="armo"), "reward.kind 'armo' is unknown"),
    (RewardConfig(), "reward.model_path is required for kind bradley_terry"),
    (RewardConfig(model_path="rm", batch_size=0), "reward.batch_size must be >= 1"),
    (RewardConfig(model_path="rm", dtype="fp8"), "reward.dtype must be one of"),
    (RewardConfig(kind="function"), "reward.function must be 'file.py:name'"),
    (RewardConfig(kind="function", function="my.py"), "reward.function must be"),
    (RewardConfig(kind="function", function="my.py:not-an-identifier"), "reward.function must be"),
    (RewardConfig(kind="combined"), "reward.components is empty"),
    (RewardConfig(kind="combined", normalize="rank", components=[
        RewardComponent(name="a", reward=RewardConfig(kind="function", function="m:f"))]), "reward.normalize must be"),
    (RewardConfig(kind="combined", components=[
        RewardComponent(name="a", reward=RewardConfig(kind="function", function="m:f")),
        RewardComponent(name="a", reward=RewardConfig(kind="function", function="m:g"))]), "repeated names"),
    (RewardConfig(kind="combined", components=[RewardComponent(name="a", reward=RewardConfig(kind="pairwise"))]),
     r"reward.components\[0\].reward.model_path is required"),
    (RewardConfig(kind="pairwise", model_path="j", pairwise=PairwiseConfig(ranking="swiss")),
     "reward.pairwise.ranking must be one of"),
    (RewardConfig(kind="pairwise", model_path="j", pairwise=PairwiseConfig(template="{context} {response_a}")),
     r"reward.pairwise.template lacks \{response_b\}"),
    (RewardConfig(kind="remote"), "reward.remote.url must be an http"),
    (RewardConfig(kind="remote", remote=RemoteConfig(url="http://h", protocol="grpc")), "reward.remote.protocol"),
    (RewardConfig(kind="remote", remote=RemoteConfig(url="http://h", concurrency=0)), "reward.remote.concurrency"),
    (RewardConfig(model_path="rm", length_penalty=-1.0), "reward.length_penalty must be >= 0"),
    (RewardConfig(kind="combined", components=[RewardComponent(name="a", reward=RewardConfig(
        kind="function", function="m:f", length_penalty=0.1))]),
     r"reward.components\[0\].reward sets length_penalty or objective_weights, which apply to the whole reward"),
])
def test_problems_name_the_key(cfg, message):
    problems = reward_config_problems(cfg)
    assert problems and any(re.search(message, p) for p in problems), problems


def test_reward_config_and_registry_import_without_torch():
    code = "import reward, reward.config, reward.registry, sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
