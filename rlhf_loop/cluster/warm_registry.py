"""Warm actors (`cluster.keep_warm`) on the Ray cluster: the registry of claims, the detached placement groups, the
end of a run that leaves its warm actors alive, and `rlhf-loop cluster release`.

A keep_warm run joins the cluster in the namespace `NAMESPACE`, where its rollout engines and reward actor and their
placement groups are detached and named by their slot (`rlhf_loop.cluster.warm`): they outlive the run, and the next
run with the same settings finds them by name. Exclusive use: at its start a run takes its slots from the registry, a
detached actor whose calls run one at a time, under its Ray job id, and gives them back at its end. A slot held by a
live job makes the run start actors of its own, which end with it; one held by a job whose driver is gone (crashed,
killed) is taken over.

    slots = take_warm_slots(cfg, policy, device, layout)   # {} when another running job holds them
    group = warm_group(slots["rollout"].name, bundles, "PACK")   # the live one, or a new one
    ...                                                    # the run; its engines and reward actor named by the slots
    leave_warm_actors(address)                             # at the end: slots given back, one line in the log
    release_warm_actors()                                  # `rlhf-loop cluster release`: every free slot stopped
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ray

from rlhf_loop.cluster.warm import NAMESPACE, Claims, WarmSlot, warm_slots
from rlhf_loop.common.console import say

if TYPE_CHECKING:
    from policy.config import PolicyConfig
    from rlhf_loop.cluster.placement import Layout
    from rlhf_loop.config import RunConfig

REGISTRY = "claims"  # the registry actor's name in NAMESPACE
# The registry answers in milliseconds once it runs; the first run of a cluster waits for its worker to start.
REGISTRY_TIMEOUT_S = 120.0


def job_alive(job: str) -> bool:
    """Whether the Ray job `job` (hex id) still has its driver, by the cluster's job table (the GCS's, which needs no
    dashboard); a job the table does not know is gone."""
    from ray._private.state import jobs

    return any(entry["JobID"] == job and not entry["IsDead"] for entry in jobs())


class _Registry:
    """The cluster's claims on warm slots, in one detached actor: its calls run one at a time, so a take is atomic."""

    def __init__(self) -> None:
        self.claims = Claims()

    def take(self, slots: Mapping[str, Sequence[str]], job: str) -> dict[str, str]:
        return self.claims.take(slots, job, job_alive)

    def release(self, job: str) -> list[str]:
        return self.claims.release(job)

    def forget(self, slot: str) -> None:
        self.claims.forget(slot)

    def listing(self) -> dict[str, dict[str, Any]]:
        return self.claims.listing(job_alive)


def _registry(create: bool) -> Any | None:
    if create:
        return (ray.remote(_Registry)
                .options(name=REGISTRY, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0)
                .remote())
    try:
        return ray.get_actor(REGISTRY, namespace=NAMESPACE)
    except ValueError:
        return None


def _ask_registry(method: str, *args: Any) -> Any:
    """`method(*args)` on the registry, made when there is none. A registry that died under the call (a release
    stopped it) is made again once."""
    try:
        return ray.get(getattr(_registry(create=True), method).remote(*args), timeout=REGISTRY_TIMEOUT_S)
    except ray.exceptions.RayActorError:
        return ray.get(getattr(_registry(create=True), method).remote(*args), timeout=REGISTRY_TIMEOUT_S)


def this_job() -> str:
    return ray.get_runtime_context().get_job_id()


def take_warm_slots(cfg: RunConfig, policy: PolicyConfig, device: str, layout: Layout) -> dict[str, WarmSlot]:
    """This run's warm slots (role -> slot), taken for it; {} when a running job holds one of them, said in one line:
    then this run's actors are its own and end with it."""
    slots = warm_slots(cfg, policy, device, layout)
    if not slots:
        return {}
    busy = _ask_registry("take", {slot.name: slot.actors for slot in slots.values()}, this_job())
    if busy:
        say(f"rlhf-loop: the warm actors for these settings are in use by a running job (Ray job "
            f"{', '.join(sorted(set(busy.values())))}); this run starts actors of its own, which end with it")
        return {}
    return slots


def warm_group(name: str, bundles: list[dict[str, float]], strategy: str) -> tuple[Any, bool]:
    """The detached placement group `name` of this namespace, or a new one; and whether it is new."""
    group = _existing_group(name)
    if group is not None:
        return group, False
    return ray.util.placement_group(bundles, strategy=strategy, name=name, lifetime="detached"), True


def leave_warm_actors(address: str | None) -> None:
    """The end of a keep_warm run: the slots it held are given back, their actors left alive for the next run, and
    one line says so. Nothing when it held none (another run had them, or it stopped before taking them)."""
    if not ray.is_initialized():
        return
    registry = _registry(create=False)
    if registry is None:
        return
    try:
        released = ray.get(registry.release.remote(this_job()), timeout=REGISTRY_TIMEOUT_S)
    except ray.exceptions.RayError as error:  # the run's own outcome matters more; the claim lapses with this job
        say(f"rlhf-loop: could not give the warm actors back ({type(error).__name__}); the next run takes them over "
            f"once this driver has exited")
        return
    if released:
        roles = " and ".join(sorted({slot.rsplit("-", 1)[0] for slot in released}, reverse=True))
        say(f"rlhf-loop: the {roles} actors stay alive on the cluster for the next run with these settings "
            f"(cluster.keep_warm); `rlhf-loop cluster release --address {address or 'auto'}` stops them")


def release_warm_actors() -> list[str]:
    """`rlhf-loop cluster release`: every warm slot that no running job holds is stopped (its actors and placement
    group), and the registry too once none is left; one line per slot. A slot in use is kept, and named."""
    registry = _registry(create=False)
    listing = ray.get(registry.listing.remote(), timeout=REGISTRY_TIMEOUT_S) if registry is not None else {}
    # actors whose registry is gone (stopped by hand): nobody can claim them, so they are free
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == NAMESPACE and entry["name"] != REGISTRY:
            slot = entry["name"].rsplit("-", 1)[0]
            listing.setdefault(slot, {"actors": [], "holder": None, "alive": False})
            if entry["name"] not in listing[slot]["actors"]:
                listing[slot]["actors"].append(entry["name"])
    lines = []
    for slot, info in sorted(listing.items()):
        busy = _ask_registry("take", {slot: info["actors"]}, this_job()) if registry is not None else {}
        if busy:
            lines.append(f"kept {slot}: in use by the running Ray job {busy[slot]}")
            continue
        stopped = 0
        for name in info["actors"]:
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
                stopped += 1
            except ValueError:  # already gone
                pass
        group = _existing_group(slot)
        if group is not None:
            ray.util.remove_placement_group(group)
        if registry is not None:
            ray.get(registry.forget.remote(slot), timeout=REGISTRY_TIMEOUT_S)
        lines.append(f"stopped {slot}: {stopped} actor{'s' if stopped != 1 else ''} and its placement group")
    if registry is not None and not ray.get(registry.listing.remote(), timeout=REGISTRY_TIMEOUT_S):
        ray.kill(registry)
    return lines or ["no warm actors on this cluster"]


def _existing_group(name: str) -> Any | None:
    try:
        return ray.util.get_placement_group(name)
    except ValueError:
        return None
