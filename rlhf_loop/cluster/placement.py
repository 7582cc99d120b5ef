"""Where each role's actors go, worked out from the config without Ray: one placement group per role (or one shared
by the colocated roles), one bundle per actor. `rlhf-loop plan` prints it; the driver reserves every group before any
actor starts (`rlhf_loop.cluster.roles`), and explains with `unplaceable` a group the cluster could not place.

    layout = role_layout(cfg, "cuda")
    layout.groups     # [Group("rollout", ...), Group("reward", ...), Group("learner", ...)]
    layout.slots      # {"rollout": [ActorSlot("rollout", 0, cpus, gpus)], ...}: one per actor, in rank order
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf_loop.config import PLACEMENT_STRATEGIES, RolePlacement, RunConfig

# Ray refuses a bundle without resources, and a CPU actor reserving a whole core would not fit the roles on a 2-core
# machine: each actor reserves a hundredth of a core. It only books the place; the actor's threads are not limited.
CPU_SHARE = 0.01
# Each actor's bundle takes this much of its role's node resource, so a node started with {"gpu_node_a": 1} holds
# up to a thousand actors: the label picks the node, it does not count anything.
LABEL_SHARE = 0.001
RAY_STRATEGIES = {name: name.upper() for name in PLACEMENT_STRATEGIES}  # pack -> PACK, strict_spread -> STRICT_SPREAD
COLOCATED = "colocated"


@dataclass(frozen=True)
class ActorSlot:
    """One actor's place: bundle `bundle` of placement group `group`, and what the actor takes from it."""

    group: str
    bundle: int
    num_cpus: float
    num_gpus: float


@dataclass(frozen=True)
class Group:
    """One placement group: the roles in it, how its bundles spread over nodes, and the bundles."""

    name: str  # a role, or "colocated"
    roles: tuple[str, ...]
    strategy: str  # one of PLACEMENT_STRATEGIES
    resource: str | None  # the node resource every bundle asks for (cluster.placement.ROLE.resource)
    bundles: tuple[dict[str, float], ...]

    @property
    def ray_strategy(self) -> str:
        return RAY_STRATEGIES[self.strategy]

    @property
    def config_key(self) -> str:
        """Where the user changes this group's placement: a colocated group follows the learner's."""
        return f"cluster.placement.{'learner' if self.name == COLOCATED else self.name}"


@dataclass(frozen=True)
class Layout:
    groups: tuple[Group, ...]
    slots: dict[str, list[ActorSlot]]  # role -> one slot per actor (rank order)


def engines_start_first(cfg: RunConfig, device: str) -> bool:
    """Whether the rollout engines start before the other roles: wherever they may share a GPU (colocated, or any
    role holding a fraction of one, which Ray may pack onto one device), since vLLM sizes its KV cache from the
    memory it finds free while it profiles, and must not find the learner's or the reward model's allocations there."""
    gpus = role_gpus(cfg, device)
    return "rollout" in gpus and (cfg.cluster.colocate or any(0 < share < 1 for share in gpus.values()))


def role_gpus(cfg: RunConfig, device: str) -> dict[str, float]:
    """The GPUs each actor of each started role reserves: none on CPU; the reward only when it runs a network."""
    from reward.registry import uses_accelerator

    cuda = device == "cuda"
    gpus = {}
    if cfg.online:
        gpus["rollout"] = cfg.rollout.gpus_per_engine if cuda else 0.0
        gpus["reward"] = cfg.reward.num_gpus if cuda and uses_accelerator(cfg.reward) else 0.0
    if cfg.train.enabled:
        gpus["learner"] = cfg.train.gpus_per_worker if cuda else 0.0
    return gpus


def role_layout(cfg: RunConfig, device: str) -> Layout:
    """A group per role; with cluster.colocate, one group of a GPU per learner rank, each holding that rank and one
    engine (and GPU 0 the reward model too when it runs a network): the GPU is split evenly among them in Ray's
    books, while vLLM's real share is rollout.gpu_memory_utilization."""
    gpus = role_gpus(cfg, device)
    counts = {"rollout": cfg.rollout.num_engines, "reward": 1, "learner": cfg.train.num_workers}
    shared: dict[int, list[str]] = {}  # bundle -> roles in it, for the colocated group
    if cfg.cluster.colocate and device == "cuda" and "rollout" in gpus and "learner" in gpus:  # else refused
        for rank in range(counts["learner"]):
            shared[rank] = ["learner", "rollout"] + (["reward"] if rank == 0 and gpus["reward"] > 0 else [])
    colocated_roles = tuple(role for role in ("rollout", "reward", "learner")
                            if any(role in members for members in shared.values()))
    groups, slots = [], {}
    for role in ("rollout", "reward", "learner"):
        if role not in gpus or role in colocated_roles:
            continue
        placement = getattr(cfg.cluster.placement, role)
        bundle = _bundle(1, gpus[role], placement.resource)
        groups.append(Group(role, (role,), placement.strategy, placement.resource, (bundle,) * counts[role]))
        slots[role] = [ActorSlot(role, index, CPU_SHARE, gpus[role]) for index in range(counts[role])]
    if shared:
        placement = cfg.cluster.placement.learner
        bundles = tuple(_bundle(len(members), 1.0, placement.resource) for members in shared.values())
        groups.append(Group(COLOCATED, colocated_roles, placement.strategy, placement.resource, bundles))
        for role in colocated_roles:
            slots[role] = [ActorSlot(COLOCATED, index, CPU_SHARE, _even_share(len(members)))
                           for index, members in shared.items() if role in members]
    return Layout(tuple(groups), slots)


def _bundle(actors: int, gpus: float, resource: str | None) -> dict[str, float]:
    bundle = {"CPU": round(actors * CPU_SHARE, 4)}
    if gpus > 0:
        bundle["GPU"] = gpus
    if resource is not None:
        bundle[resource] = round(actors * LABEL_SHARE, 4)
    return bundle


def _even_share(actors: int) -> float:
    """1/actors rounded down to Ray's resolution (1e-4), so that the shares never add up to more than the GPU."""
    return math.floor(10_000 / actors) / 10_000


def colocation_problems(cfg: RunConfig, device: str) -> list[str]:
    """cluster.colocate needs what it shares GPUs between, vLLM's sleep mode, and a GPU."""
    if not cfg.cluster.colocate:
        return []
    if device != "cuda":
        return [f"cluster.colocate shares GPUs between the engines and the learner, and device is {device}; set "
                f"cluster.colocate: false on a machine without CUDA"]
    rollout, train = cfg.rollout, cfg.train
    checks = [
        (cfg.online and train.enabled, "cluster.colocate needs rollout engines and a learner (an online run with "
                                       "train.enabled); set cluster.colocate: false"),
        (rollout.engine == "vllm", f"cluster.colocate needs vLLM's sleep mode, and rollout.engine is "
                                   f"{rollout.engine}; set rollout.engine: vllm"),
        (rollout.num_engines == train.num_workers,
         f"cluster.colocate puts one engine beside each learner rank: rollout.num_engines ({rollout.num_engines}) "
         f"must equal train.num_workers ({train.num_workers})"),
        (rollout.gpus_per_engine <= 1, f"cluster.colocate gives each engine one shared GPU; rollout.gpus_per_engine "
                                       f"{rollout.gpus_per_engine} (tensor parallel) cannot be colocated: set it to 1"),
        (cfg.cluster.placement.rollout == RolePlacement(),
         "cluster.colocate places the engines with the learner ranks; set cluster.placement.learner, and leave "
         "cluster.placement.rollout unset"),
        (rollout.weight_sync == "object_store",
         "cluster.colocate puts an engine on its learner rank's GPU, where NCCL cannot hold both ends of the "
         "collective weight sync; set rollout.weight_sync: object_store"),
        (rollout.max_staleness == 0, "cluster.colocate puts the engines to sleep while the learner trains, so they "
                                     "cannot sample ahead meanwhile; set rollout.max_staleness: 0"),
    ]
    return [message for ok, message in checks if not ok]


# ---- a group the cluster did not place ---------------------------------------------------------------------------

def unplaceable(group: Group, nodes: list[dict[str, float]], timeout_s: float) -> str:
    """One line: why the cluster (its alive nodes' total resources) could not place `group`, and what to change."""
    what = f"the cluster did not place the {' and '.join(group.roles)} within {timeout_s:g} s"
    key, bundle = group.config_key, group.bundles[0]
    if group.resource is not None and not any(group.resource in node for node in nodes):
        return (f"{what}: no node has the resource {group.resource!r} ({key}.resource); start the node with "
                f"`ray start ... --resources='{{\"{group.resource}\": 1}}'`, or fix the name")
    fitting = [node for node in nodes if _holds(node, bundle)]
    needs = _describe(bundle)
    if not fitting:
        return (f"{what}: no node{_with(group)} has room for one actor ({needs}); add such a node, or ask for "
                f"fewer GPUs per actor")
    if group.strategy == "strict_spread" and len(fitting) < len(group.bundles):
        return (f"{what}: strict_spread puts each of its {len(group.bundles)} actors on its own node, and "
                f"{len(fitting)} node(s){_with(group)} can hold one; set {key}.strategy to spread, or add nodes")
    total = {name: amount * len(group.bundles) for name, amount in bundle.items()}
    if group.strategy == "strict_pack" and not any(_holds(node, total) for node in fitting):
        return (f"{what}: strict_pack puts its {len(group.bundles)} actors on one node, and no node{_with(group)} "
                f"holds {_describe(total)}; set {key}.strategy to pack")
    return (f"{what} ({len(group.bundles)} x {needs}): the resources are taken, by other jobs on the cluster or "
            f"by GPUs the other roles hold; free them, or raise cluster.placement.timeout_s if nodes are still "
            f"joining")


def _holds(node: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(node.get(name, 0.0) + 1e-9 >= amount for name, amount in bundle.items())


def _with(group: Group) -> str:
    return f" with {group.resource}" if group.resource is not None else ""


def _describe(bundle: dict[str, float]) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in bundle.items())


# ---- text for `rlhf-loop plan` -----------------------------------------------------------------------------------

def describe_layout(layout: Layout) -> list[str]:
    lines = []
    for group in layout.groups:
        nodes = f"nodes with {group.resource}" if group.resource is not None else "any node"
        bundles = "; ".join(f"{count} x {{{_describe(bundle)}}}" for bundle, count in _runs(group.bundles))
        lines.append(f"  {group.name:9s} {group.strategy} on {nodes}: {bundles}")
        if group.name == COLOCATED:
            for role in group.roles:
                slots = layout.slots[role]
                lines.append(f"    {role}: bundle(s) {', '.join(str(slot.bundle) for slot in slots)}, "
                             f"{slots[0].num_gpus:g} GPU each (Ray's books; vLLM takes rollout.gpu_memory_utilization)")
    return lines


def _runs(bundles: tuple[dict[str, float], ...]) -> list[tuple[dict[str, float], int]]:
    runs: list[tuple[dict[str, float], int]] = []
    for bundle in bundles:
        if runs and runs[-1][0] == bundle:
            runs[-1] = (bundle, runs[-1][1] + 1)
        else:
            runs.append((bundle, 1))
    return runs
