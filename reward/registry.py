"""Reward kinds by name: `build_reward_model(cfg, device)` turns a reward config into a scorer.

Imports stay lazy: `plan` and the server import this module, and must not pull in torch or transformers here.
The kinds' names (`reward.config.KINDS`) are config vocabulary; every one has a builder below.
"""

from __future__ import annotations

from collections.abc import Callable

from reward.base import NamedRewardModel
from reward.config import MODEL_KINDS, RewardConfig, reward_config_problems
from rlhf_loop.common.errors import UserError


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

    terms = [(component.name, component.weight,
              build_reward_model(component.reward, device, f"{key}.components[{i}].reward"))
             for i, component in enumerate(cfg.components)]
    return CombinedReward(cfg, terms)


def _remote(cfg: RewardConfig, device: str, key: str) -> NamedRewardModel:
    from reward.remote import RemoteReward

    return RemoteReward(cfg, key)


def _outcome(cfg: RewardConfig, device: str, key: str) -> NamedRewardModel:
    from reward.outcome import OutcomeReward

    return OutcomeReward(cfg)


_BUILDERS: dict[str, Callable[[RewardConfig, str, str], NamedRewardModel]] = {
    "bradley_terry": _bradley_terry,
    "armorm": _armorm,
    "pairwise": _pairwise,
    "function": _function,
    "combined": _combined,
    "remote": _remote,
    "outcome": _outcome,
}


def build_reward_model(cfg: RewardConfig, device: str, key: str = "reward") -> NamedRewardModel:
    """Load the scorer `cfg` describes on `device` ("cpu", "cuda" or "cuda:N").

    Everything that can be wrong with the config or the model (unknown kind, unreadable directory, no score head,
    custom code without trust_remote_code, unreachable server) raises a one-line UserError here, at start-up.
    `key` is the config section that error messages name.
    """
    problems = reward_config_problems(cfg, key)
    if problems:
        raise UserError(problems[0])
    return _BUILDERS[cfg.kind](cfg, device, key)


def check_model_files(cfg: RewardConfig, key: str = "reward") -> None:
    """The checks config.json alone allows (custom code without trust_remote_code, a missing score head), for the
    pre-run checks: seconds, no weights loaded, before the run directory is written. Raises UserError."""
    if cfg.kind == "combined":
        for i, component in enumerate(cfg.components):
            check_model_files(component.reward, f"{key}.components[{i}].reward")
    elif cfg.kind in ("bradley_terry", "armorm"):
        from reward.classifier import ArmoRMReward, BradleyTerryReward

        (BradleyTerryReward if cfg.kind == "bradley_terry" else ArmoRMReward).check_files(cfg, key)
    elif cfg.kind == "pairwise":
        from reward.hf import read_model_config

        read_model_config(cfg.model_path, cfg.trust_remote_code, key)


def uses_accelerator(cfg: RewardConfig) -> bool:
    """Whether scoring runs a network locally (so its actor should hold a GPU when there is one)."""
    return cfg.kind in MODEL_KINDS or any(uses_accelerator(c.reward) for c in cfg.components)
