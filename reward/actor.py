"""The reward model in its own Ray actor, started by the loop after `ray.init`.

    scorer = RewardScorer(cfg.reward, device)   # loads the model; bad configs fail here with a UserError
    results = scorer.score(queries)              # blocking; one RewardResult per query
    scorer.shutdown()

A dead reward actor is restarted by Ray (up to `max_restarts` times); the scorer loads the model into it again and
scores the batch again, so scores are as if nothing happened.

A warm reward actor (cluster.keep_warm, `name` given) is the live detached actor of that name, left by an earlier run
with the same settings, or a new one started detached. It keeps nothing of a run: scoring reads the model and the
objective weights only (a reward function's own module-level state is the user's to keep out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reward.base import RewardQuery, RewardResult
from reward.config import RewardConfig
from reward.registry import uses_accelerator
from reward.shaping import objective_weights_problem, weigh_objectives
from rlhf_loop.common.actor_calls import (
    REUSE_CHECK_TIMEOUT_S,
    ActorDied,
    detached,
    placement,
    reusable_actor,
    wait,
    wait_restarted,
    was_restarted,
)
from rlhf_loop.common.console import say
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.faults import maybe_kill_actor
from rlhf_loop.common.user_code import absolute_reference


class _RewardActor:
    """Holds the scorer. The model is built in `start`, not `__init__`, so a bad config comes back to the caller
    as its own exception (Ray reports a failing `__init__` only as a dead actor with a traceback in a string)."""

    def start(self, cfg: RewardConfig, device: str) -> list[str]:
        """Builds the model, unless it is built from these arguments already (a warm actor taken by a later run)."""
        from reward.registry import build_reward_model

        if getattr(self, "built_from", None) == (cfg, device):
            return list(self.model.objectives)

        if device == "cpu":
            # Scoring runs while the engines generate, on the same cores, each engine at every core
            # (cluster.threads_per_actor): more threads than cores make every OpenMP barrier wait for a thread the
            # scheduler took off its core (the toy's generation ran 1.6x slower with the learner's forward passes
            # beside it at two threads each).
            import torch

            torch.set_num_threads(1)
        self.model = build_reward_model(cfg, device)
        problem = objective_weights_problem(cfg.objective_weights, self.model.objectives)
        if problem is not None:
            raise UserError(problem)
        self.objective_weights = dict(cfg.objective_weights)
        self.built_from = (cfg, device)
        return list(self.model.objectives)

    def score(self, queries: Sequence[RewardQuery]) -> list[RewardResult]:
        """The model's results, with reward.objective_weights aggregating the objectives into the score."""
        maybe_kill_actor("reward")  # the kill tests' RLHF_LOOP_KILL_ACTOR
        return weigh_objectives(self.model.score(queries), self.objective_weights)

    def restarted(self) -> bool:
        return was_restarted()

    def placement(self) -> dict[str, Any]:
        return placement()


class RewardScorer:
    """Client side of the reward actor; on CUDA it reserves `cfg.num_gpus` when the kind runs a network."""

    def __init__(self, cfg: RewardConfig, device: str, max_restarts: int = 0,
                 placement: dict[str, Any] | None = None, name: str | None = None) -> None:
        """`placement`: the Ray options that put the actor on its placement-group bundle (`rlhf_loop.cluster.roles`).
        `name`: a warm actor (cluster.keep_warm), reused when it is alive (`reused`), else started detached."""
        import ray

        on_gpu = device.startswith("cuda") and uses_accelerator(cfg)
        resources = {"num_cpus": 0, "num_gpus": cfg.num_gpus if on_gpu else 0, **(placement or {})}
        actor_class = ray.remote(_RewardActor).options(**resources, max_restarts=max_restarts, max_task_retries=0,
                                                       **detached(name))
        kept = reusable_actor(name, REUSE_CHECK_TIMEOUT_S) if name is not None else None
        self.reused = [kept is not None]
        self._actor = kept or actor_class.remote()
        self._start_arguments = (_with_absolute_paths(cfg), device)
        self.timeout_s = cfg.call_timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0
        self.objectives: list[str] = self._wait(self._actor.start.remote(*self._start_arguments), "start-up")

    def score(self, queries: Sequence[RewardQuery]) -> list[RewardResult]:
        queries = list(queries)
        while True:
            try:
                return self._wait(self._actor.score.remote(queries), "score")
            except ActorDied:
                if self.restarts >= self.max_restarts:
                    raise
                self.restarts += 1
                say(f"rlhf-loop: the reward actor died while scoring; restarted it ({self.restarts} of "
                    f"{self.max_restarts} restarts) and scoring the batch again")
                wait_restarted(lambda: self._actor.start.remote(*self._start_arguments), self.timeout_s,
                               "reward actor", "reward.call_timeout_s")

    def placement(self) -> list[dict[str, Any]]:
        """Where the reward actor runs (node id, address, pid), as the only item of a list like the other roles'."""
        return [self._wait(self._actor.placement.remote(), "placement")]

    def shutdown(self) -> None:
        import ray

        ray.kill(self._actor)

    def _wait(self, ref: Any, stage: str) -> Any:
        return wait(ref, self.timeout_s, "reward actor", stage, "reward.call_timeout_s")


def _with_absolute_paths(cfg: RewardConfig) -> RewardConfig:
    """Relative files in the config mean the driver's working directory, wherever the actor runs."""
    function = absolute_reference(cfg.function)
    model_path = cfg.model_path
    if model_path is not None and Path(model_path).expanduser().exists():
        model_path = str(Path(model_path).expanduser().resolve())
    components = [dataclasses.replace(c, reward=_with_absolute_paths(c.reward)) for c in cfg.components]
    return dataclasses.replace(cfg, function=function, model_path=model_path, components=components)
