"""The roles of a run as Ray actors: the rollout engines and the reward model (online runs) and the DPO learner
(train.enabled), started at once, with where each ran and how long it took to start."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from policy.config import PolicyConfig
from rlhf_loop.rundir import atomic_write_json

if TYPE_CHECKING:  # they import Ray
    from policy.learner_group import LearnerGroup
    from policy.rollout_group import RolloutGroup
    from reward.actor import RewardScorer
    from rlhf_loop.stages import Run


def start_actors(run: Run, policy: PolicyConfig, device: str
                 ) -> tuple[RolloutGroup | None, RewardScorer | None, LearnerGroup | None]:
    """The rollout engines and the reward model (online runs) and the learner (train.enabled), started at once: each
    spends its start-up loading models, so together they take as long as the slowest, not the sum. Where each
    actor runs and how long each role took to start go to RUN_DIR/placement.json and the log."""
    from policy.learner_group import LearnerGroup
    from policy.rollout_group import RolloutGroup
    from reward.actor import RewardScorer

    cfg, restarts = run.cfg, run.cfg.cluster.max_actor_restarts  # a dead engine or reward actor is restarted
    roles: dict[str, Callable[[], Any]] = {}
    if cfg.online:  # offline DPO trains on a given preference dataset and samples nothing
        roles["rollout"] = lambda: RolloutGroup(policy, cfg.rollout, device, cfg.max_model_len, cfg.seed, restarts)
        roles["reward"] = lambda: RewardScorer(cfg.reward, device, restarts)
    if cfg.train.enabled:
        roles["learner"] = lambda: LearnerGroup(policy, cfg.train, device, cfg.seed)

    def timed(start: Callable[[], Any]) -> tuple[Any, float]:
        began = time.perf_counter()
        return start(), time.perf_counter() - began

    with ThreadPoolExecutor(max_workers=len(roles) or 1, thread_name_prefix="start") as pool:
        futures = {role: pool.submit(timed, start) for role, start in roles.items()}
        started = {role: future.result() for role, future in futures.items()}
    actors = {role: actor for role, (actor, _) in started.items()}
    placement = {role: {"startup_s": round(seconds, 2), "actors": actor.placement()}
                 for role, (actor, seconds) in started.items()}
    atomic_write_json(run.run_dir.root / "placement.json", placement)
    logging.getLogger(__name__).info("start-up: %s", ", ".join(f"{role} {info['startup_s']:.1f} s"
                                                               for role, info in placement.items()))
    return actors.get("rollout"), actors.get("reward"), actors.get("learner")
