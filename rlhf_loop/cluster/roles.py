"""The roles of a run as Ray actors: the rollout engines and the reward model (online runs) and the DPO learner
(train.enabled). Every role's placement group is reserved first (`rlhf_loop.cluster.placement` lays them out), then the
roles start at once, each actor on its bundle; where each ran and how long it took to start go to placement.json, and
on more than one node every node must share the run directory (`rlhf_loop.cluster.shared_storage`). Under
cluster.keep_warm the rollout engines and the reward actor, and their groups, are the live ones an earlier run left
when the run can take them (`rlhf_loop.cluster.warm_registry`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policy.config import PolicyConfig
from rlhf_loop.common.background import in_background
from rlhf_loop.config import RunConfig
from rlhf_loop.common.errors import UserError
from rlhf_loop.cluster.placement import Layout, ActorSlot, engines_start_first, role_layout, unplaceable
from rlhf_loop.cluster.shared_storage import check_shared_storage
from rlhf_loop.common.files import atomic_write_json

if TYPE_CHECKING:  # they import Ray
    from policy.learner_group import LearnerGroup
    from policy.rollout_group import RolloutGroup
    from reward.actor import RewardScorer
    from rlhf_loop.driver.stages import Run


@dataclass(frozen=True)
class Started:
    """The roles' actors, how long each role took to start, and where the layout put them."""

    actors: dict[str, Any]
    seconds: dict[str, float]
    layout: Layout
    warm: frozenset[str] = frozenset()  # the roles kept warm (cluster.keep_warm): their actors say which were reused


def start_actors(run: Run, policy: PolicyConfig, device: str, early: Future[Started] | None = None
                 ) -> tuple[RolloutGroup | None, RewardScorer | None, LearnerGroup | None]:
    """The rollout engines and the reward model (online runs) and the learner (train.enabled): the ones `early`
    started while the config was checked (`launch_early`), else started now. Where each actor runs and how long each
    role took to start go to RUN_DIR/placement.json and the log."""
    started = early.result() if early is not None else launch(run.cfg, policy, device)
    placement = {role: {"startup_s": round(started.seconds[role], 2), "placement": requested(started.layout, role),
                        "actors": actors_placed(actor, started.layout.slots[role], role in started.warm)}
                 for role, actor in started.actors.items()}
    atomic_write_json(run.run_dir.root / "placement.json", placement)
    checked_s = check_shared_storage(run.run_dir.root, placement, run.cfg.cluster.placement.timeout_s)
    since_launch = seconds_since_launch()
    logging.getLogger(__name__).info(
        "start-up: %s%s%s", ", ".join(f"{role} {info['startup_s']:.1f} s{kept_warm(info['actors'])}"
                                      for role, info in placement.items()),
        "" if since_launch is None else f"; every actor ready {since_launch:.1f} s after launch",
        "" if checked_s is None else f"; the run directory is shared by every node (checked in {checked_s:.2f} s)")
    return started.actors.get("rollout"), started.actors.get("reward"), started.actors.get("learner")


def actors_placed(actor: Any, slots: list[ActorSlot], warm: bool) -> list[dict[str, Any]]:
    """Where each of a role's actors runs and on which bundle; for a role kept warm, whether it was reused."""
    placed = [{**where, "bundle": slot.bundle} for where, slot in zip(actor.placement(), slots, strict=True)]
    if warm:
        placed = [{**where, "reused": reused} for where, reused in zip(placed, actor.reused, strict=True)]
    return placed


def kept_warm(actors: list[dict[str, Any]]) -> str:
    """What the start-up line adds for a role kept warm, e.g. " (kept warm: 1 of 1 reused)"; nothing otherwise."""
    if not actors or "reused" not in actors[0]:
        return ""
    return f" (kept warm: {sum(actor['reused'] for actor in actors)} of {len(actors)} reused)"


def launch_early(cfg: RunConfig, device: str) -> Future[Started] | None:
    """The actors, started in the background while the driver checks the config and makes the run directory (they
    need neither): their start-up, mostly imports and model loading, overlaps the driver's. None when the actors
    need the run first: an SFT warm start makes the policy they load. The thread is a daemon: when the check fails,
    the process exits (and Ray stops, taking the half-started actors) without waiting for it."""
    if cfg.sft.enabled:
        return None
    return in_background(launch, cfg, cfg.policy, device, name="start-actors")


def launch(cfg: RunConfig, policy: PolicyConfig, device: str) -> Started:
    """Every role's placement group reserved, then the roles' actors started at once: each spends its start-up
    loading models, so together they take as long as the slowest, not the sum. Engines that may share a GPU start
    before the others (`engines_start_first`): vLLM sizes its share of the GPU from the memory free when it starts."""
    from policy.learner_group import LearnerGroup
    from policy.rollout_group import RolloutGroup
    from reward.actor import RewardScorer

    restarts = cfg.cluster.max_actor_restarts  # a dead engine or reward actor is restarted
    layout = role_layout(cfg, device)
    warm = {}
    if cfg.cluster.keep_warm:
        from rlhf_loop.cluster.warm_registry import take_warm_slots

        warm = take_warm_slots(cfg, policy, device, layout)
    options = reserve(layout, cfg.cluster.placement.timeout_s, {role: slot.name for role, slot in warm.items()})
    colocate = cfg.cluster.colocate
    roles: dict[str, Callable[[], Any]] = {}
    if cfg.online:  # offline DPO trains on a given preference dataset and samples nothing
        roles["rollout"] = lambda: RolloutGroup(policy, cfg.rollout, device, cfg.max_model_len, cfg.seed, restarts,
                                                options["rollout"], sleeps=colocate, environment=cfg.environment,
                                                names=warm["rollout"].actors if warm else None)
        roles["reward"] = lambda: RewardScorer(cfg.reward, device, restarts, options["reward"][0],
                                               name=warm["reward"].actors[0] if warm else None)
    if cfg.train.enabled:
        roles["learner"] = lambda: LearnerGroup(policy, cfg.train, device, cfg.seed, options["learner"])

    def timed(start: Callable[[], Any]) -> tuple[Any, float]:
        began = time.perf_counter()
        return start(), time.perf_counter() - began

    started = {}
    if engines_start_first(cfg, device):
        started["rollout"] = timed(roles.pop("rollout"))
    # Daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's threads at exit, so a run refused
    # while its actors start would wait in their `ray.get` (after Ray stopped) until call_timeout_s, spinning a core.
    futures = {role: in_background(timed, start, name=f"start-{role}") for role, start in roles.items()}
    started |= {role: future.result() for role, future in futures.items()}
    return Started({role: actor for role, (actor, _) in started.items()},
                   {role: seconds for role, (_, seconds) in started.items()}, layout, frozenset(warm))


def reserve(layout: Layout, timeout_s: float, kept: dict[str, str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every group of the layout, reserved before any actor starts; then each role's Ray options, one per actor.
    A group not placed within `timeout_s` releases them all (but warm ones an earlier run made) and stops the run with
    one line: which role, why, and what to change. The groups live as long as this driver, except those in `kept`
    (group name -> warm slot name, cluster.keep_warm): detached, found again by a later run, made when missing."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not layout.groups:
        return {}
    kept = kept or {}
    groups, made = {}, []
    for group in layout.groups:
        if group.name in kept:
            from rlhf_loop.cluster.warm_registry import warm_group

            groups[group.name], new = warm_group(kept[group.name], list(group.bundles), group.ray_strategy)
        else:
            groups[group.name], new = ray.util.placement_group(list(group.bundles), strategy=group.ray_strategy), True
        if new:
            made.append(groups[group.name])
    ready, _ = ray.wait([pg.ready() for pg in groups.values()], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        placed = set(ray.get(ready))
        missing = next(group for group in layout.groups if groups[group.name] not in placed)
        for pg in made:
            ray.util.remove_placement_group(pg)
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        raise UserError(unplaceable(missing, nodes, timeout_s))

    def ray_options(slot: ActorSlot) -> dict[str, Any]:
        strategy = PlacementGroupSchedulingStrategy(groups[slot.group], placement_group_bundle_index=slot.bundle)
        return {"num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus, "scheduling_strategy": strategy}

    return {role: [ray_options(slot) for slot in slots] for role, slots in layout.slots.items()}


def requested(layout: Layout, role: str) -> dict[str, Any]:
    """What the config asked of the cluster for a role, as placement.json records it beside where its actors ran."""
    group = next(group for group in layout.groups if role in group.roles)
    return {"group": group.name, "resource": group.resource, "strategy": group.strategy,
            "bundles": [group.bundles[slot.bundle] for slot in layout.slots[role]]}


def seconds_since_launch() -> float | None:
    """How long ago this process started, interpreter start-up included (Linux's /proc; None elsewhere)."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: clock ticks after boot
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None
