"""The reward model in its own Ray actor, started by the loop after `ray.init`.

    scorer = RewardScorer(cfg.reward, device)   # loads the model; bad configs fail here with a UserError
    results = scorer.score(queries)              # blocking; one RewardResult per query
    scorer.shutdown()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from reward.base import RewardQuery, RewardResult
from reward.config import RewardConfig
from reward.registry import uses_accelerator
from reward.shaping import objective_weights_problem, weigh_objectives
from rlhf_loop.errors import UserError


class _RewardActor:
    """Holds the scorer. The model is built in `start`, not `__init__`, so a bad config comes back to the caller
    as its own exception (Ray reports a failing `__init__` only as a dead actor with a traceback in a string)."""

    def start(self, cfg: RewardConfig, device: str) -> list[str]:
        from reward.registry import build_reward_model

        self.model = build_reward_model(cfg, device)
        problem = objective_weights_problem(cfg.objective_weights, self.model.objectives)
        if problem is not None:
            raise UserError(problem)
        self.objective_weights = dict(cfg.objective_weights)
        return list(self.model.objectives)

    def score(self, queries: Sequence[RewardQuery]) -> list[RewardResult]:
        """The model's results, with reward.objective_weights aggregating the objectives into the score."""
        return weigh_objectives(self.model.score(queries), self.objective_weights)


class RewardScorer:
    """Client side of the reward actor; on CUDA it reserves `cfg.num_gpus` when the kind runs a network."""

    def __init__(self, cfg: RewardConfig, device: str) -> None:
        import ray

        on_gpu = device.startswith("cuda") and uses_accelerator(cfg)
        actor_class = ray.remote(num_cpus=0, num_gpus=cfg.num_gpus if on_gpu else 0)(_RewardActor)
        self._actor = actor_class.remote()
        self.objectives: list[str] = self._call(self._actor.start.remote(_with_absolute_paths(cfg), device))

    def score(self, queries: Sequence[RewardQuery]) -> list[RewardResult]:
        return self._call(self._actor.score.remote(list(queries)))

    def shutdown(self) -> None:
        import ray

        ray.kill(self._actor)

    @staticmethod
    def _call(ref):
        """ray.get, with a UserError raised in the actor re-raised here as itself (one line, no Ray wrapper)."""
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, UserError):
                raise e.cause from None
            raise


def _with_absolute_paths(cfg: RewardConfig) -> RewardConfig:
    """Relative files in the config mean the driver's working directory, wherever the actor runs."""
    function = cfg.function
    if function is not None:
        location, _, attribute = function.rpartition(":")
        if location.endswith(".py"):
            function = f"{Path(location).expanduser().resolve()}:{attribute}"
    model_path = cfg.model_path
    if model_path is not None and Path(model_path).expanduser().exists():
        model_path = str(Path(model_path).expanduser().resolve())
    components = [dataclasses.replace(c, reward=_with_absolute_paths(c.reward)) for c in cfg.components]
    return dataclasses.replace(cfg, function=function, model_path=model_path, components=components)
