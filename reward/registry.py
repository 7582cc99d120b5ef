"""Reward kinds by name: `build_reward_model(cfg, device)` turns a reward config into a scorer.

Imports stay lazy: config validation reads `KINDS` and must not pull in torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from reward.base import RewardModel
from reward.config import RewardConfig
from rlhf_loop.errors import UserError


class NamedRewardModel(RewardModel, Protocol):
    objectives: list[str]  # the names its results carry in RewardResult.objectives (logged as per-objective means)


def _bradley_terry(cfg: RewardConfig, device: str, key: str) -> NamedRewardModel:
    from reward.classifier import BradleyTerryReward

    return BradleyTerryReward(cfg, device, key)


def _armorm(cfg: RewardConfig, device: str, key: str) -> NamedRewardModel:
    from reward.classifier import ArmoRMReward

    return ArmoRMReward(cfg, device, key)


def _pairwise(cfg: RewardConfig, device: str, key: str) -> NamedRewardModel:
    from reward.pairwise import PairwiseJudge

    return PairwiseJudge(cfg, device, key)


def _function(cfg: RewardConfig, device: str, key: str) -> NamedRewardModel:
    from reward.function import FunctionReward

    return FunctionReward(cfg, key)


def _combined(cfg: RewardConfig, device: str, key: str) -> NamedRewardModel:
    from reward.combined import CombinedReward

    return CombinedReward(cfg, device, key)


def _remote(cfg: RewardConfig, device: str, key: str) -> NamedRewardModel:
    from reward.remote import RemoteReward

    return RemoteReward(cfg, key)


_BUILDERS: dict[str, Callable[[RewardConfig, str, str], NamedRewardModel]] = {
    "bradley_terry": _bradley_terry,
    "armorm": _armorm,
    "pairwise": _pairwise,
    "function": _function,
    "combined": _combined,
    "remote": _remote,
}
KINDS: tuple[str, ...] = tuple(_BUILDERS)
MODEL_KINDS = frozenset({"bradley_terry", "armorm", "pairwise"})  # kinds that load a network (and want a GPU)


def build_reward_model(cfg: RewardConfig, device: str, key: str = "reward") -> NamedRewardModel:
    """Load the scorer `cfg` describes on `device` ("cpu", "cuda" or "cuda:N").

    Everything that can be wrong with the config or the model (unknown kind, unreadable directory, no score head,
    custom code without trust_remote_code, unreachable server) raises a one-line UserError here, at start-up.
    `key` is the config section that error messages name.
    """
    from reward.config import reward_config_problems

    problems = reward_config_problems(cfg, key)
    if problems:
        raise UserError(problems[0])
    return _BUILDERS[cfg.kind](cfg, device, key)


def uses_accelerator(cfg: RewardConfig) -> bool:
    """Whether scoring runs a network locally (so its actor should hold a GPU when there is one)."""
    return cfg.kind in MODEL_KINDS or any(uses_accelerator(c.reward) for c in cfg.components)
