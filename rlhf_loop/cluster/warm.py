"""Warm actors (`cluster.keep_warm`), the part without Ray: which actors a run may take over from an earlier run, and
the claims that keep two runs from sharing them (`rlhf_loop.cluster.warm_registry` is the part with Ray).

A role's warm actors are named by a fingerprint of everything that shapes them: the role's config (the rollout
engines' policy, engine options, context and seed, and the environment they run; the whole reward section), the
device, their placement (the role's bundles, strategy and node resource), their restart budget and threads, the local
files those configs name (each file's size and modification time; a code file's sha256), and the code the actors run
(the libraries' versions, the sizes and times of our sources). A later run whose fingerprint is the same takes the same
live actors; any difference makes new ones (the old ones stay until `rlhf-loop cluster release`).

    slots = warm_slots(cfg, policy, "cuda", layout)   # {"rollout": WarmSlot("rollout", "rollout-1a2b...", (...)), ...}
    claims = Claims()                                  # the registry actor holds one for the cluster
    claims.take({"rollout-1a2b...": ("rollout-1a2b...-0",)}, job="05000000", alive=job_alive)  # {} once taken
    claims.release("05000000")                         # at the end of the run
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_loop.common.user_code import is_code_reference

if TYPE_CHECKING:
    from policy.config import PolicyConfig
    from rlhf_loop.cluster.placement import Layout
    from rlhf_loop.config import RunConfig

NAMESPACE = "rlhf_loop_warm"  # the Ray namespace of a keep_warm run: its warm actors and their groups are named there
WARM_ROLES = ("rollout", "reward")  # the learner stays per run (docs/cluster.md says why)
# Rollout keys that steer each call (its sampling, shards, timeouts) or the weight sync, not the engine: the rest of the
# section shapes the engine, so a key added later counts unless it is listed here.
ROLLOUT_CALL_KEYS = frozenset({"samples_per_prompt", "temperature", "top_p", "max_tokens", "shard_size",
                               "max_staleness", "call_timeout_s", "weight_sync", "weight_sync_bucket_mb",
                               "weight_sync_timeout_s"})
LIBRARIES = ("ray", "torch", "transformers", "vllm", "deepspeed")
REPO = Path(__file__).resolve().parents[2]
ACTOR_SOURCES = ("policy", "reward", "rlhf_loop/common")  # what the actors run (they import only these rooms)


@dataclass(frozen=True)
class WarmSlot:
    """One role's warm actors: `name` names their placement group and the claim, `actors` each actor (rank order)."""

    role: str
    name: str
    actors: tuple[str, ...]


def warm_slots(cfg: RunConfig, policy: PolicyConfig, device: str, layout: Layout) -> dict[str, WarmSlot]:
    """The slots of the roles a run keeps warm: the rollout engines and the reward actor (none in offline DPO)."""
    code = _code_signature()
    slots = {}
    for role in WARM_ROLES:
        if role not in layout.slots:
            continue
        shape = {"role": role, "device": device, "code": code, **_role_shape(cfg, policy, role),
                 "placement": [dataclasses.asdict(group) for group in layout.groups if role in group.roles],
                 "actors": [dataclasses.asdict(slot) for slot in layout.slots[role]],
                 "max_actor_restarts": cfg.cluster.max_actor_restarts,
                 "threads_per_actor": cfg.cluster.threads_per_actor}
        name = f"{role}-{fingerprint(shape)}"
        slots[role] = WarmSlot(role, name, tuple(f"{name}-{index}" for index in range(len(layout.slots[role]))))
    return slots


def fingerprint(shape: Any) -> str:
    """16 hex digits of the sha256 of `shape` (JSON-like; local paths in it stand for their files' signatures)."""
    text = json.dumps(_with_file_signatures(shape), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _role_shape(cfg: RunConfig, policy: PolicyConfig, role: str) -> dict[str, Any]:
    if role == "reward":
        return {"reward": dataclasses.asdict(cfg.reward)}
    rollout = {key: value for key, value in dataclasses.asdict(cfg.rollout).items() if key not in ROLLOUT_CALL_KEYS}
    environment = dataclasses.asdict(cfg.environment) if cfg.environment.enabled else None
    return {"policy": dataclasses.asdict(policy), "rollout": rollout, "environment": environment,
            "max_model_len": cfg.max_model_len, "seed": cfg.seed}


def _with_file_signatures(value: Any) -> Any:
    """`value` with every string that names a local file or directory (or a "file.py:name" reference) replaced by the
    absolute path and the signature of what is there now."""
    if isinstance(value, Mapping):
        return {key: _with_file_signatures(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_with_file_signatures(item) for item in value]
    if not isinstance(value, str) or not value:
        return value
    location = value.rpartition(":")[0] if is_code_reference(value) else value
    try:
        path = Path(location).expanduser().resolve()
        if not path.exists():
            return value  # a hub id, a module reference, or not a path at all
    except (OSError, ValueError):  # not a path a filesystem takes
        return value
    if path.is_file():
        signature = hashlib.sha256(path.read_bytes()).hexdigest() if path.suffix == ".py" else _stat(path)
    else:
        signature = _tree_signature(path)
    return {"value": value, "path": str(path), "signature": signature}


def _tree_signature(directory: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, modification time in ns) of every file under `directory`, in a stable order."""
    files = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            files.append((str(path.relative_to(directory)), *_stat(path)))
    return files


def _stat(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def _code_signature() -> dict[str, Any]:
    """What the actors run: the libraries' versions and our sources' signatures (not imported: read from disk)."""
    versions = {}
    for library in LIBRARIES:
        try:
            versions[library] = metadata.version(library)
        except metadata.PackageNotFoundError:
            versions[library] = None
    sources = {source: [entry for entry in _tree_signature(REPO / source) if entry[0].endswith(".py")]
               for source in ACTOR_SOURCES}
    return {"libraries": versions, "sources": sources}


class Claims:
    """Which run (a Ray job id) holds each slot. A run takes all of its slots or none of them; a slot held by a job
    that is no longer alive (its driver crashed or was killed) is free; every slot remembers its actors' names, for
    `rlhf-loop cluster release`."""

    def __init__(self) -> None:
        self.holders: dict[str, str] = {}  # slot -> the job holding it
        self.actors: dict[str, tuple[str, ...]] = {}  # slot -> its actors' names, held or not

    def take(self, slots: Mapping[str, Sequence[str]], job: str, alive: Callable[[str], bool]) -> dict[str, str]:
        """Take every slot in `slots` (slot -> actor names) for `job`, unless another job that is `alive` holds one:
        then nothing is taken, and the busy slots come back with their holders."""
        busy = {slot: holder for slot in slots
                if (holder := self.holders.get(slot)) is not None and holder != job and alive(holder)}
        if not busy:
            for slot, actors in slots.items():
                self.holders[slot], self.actors[slot] = job, tuple(actors)
        return busy

    def release(self, job: str) -> list[str]:
        """The slots `job` held, now free (their actors stay, for the next run)."""
        released = [slot for slot, holder in self.holders.items() if holder == job]
        for slot in released:
            del self.holders[slot]
        return released

    def forget(self, slot: str) -> None:
        """The slot's actors are gone (released for good)."""
        self.holders.pop(slot, None)
        self.actors.pop(slot, None)

    def listing(self, alive: Callable[[str], bool]) -> dict[str, dict[str, Any]]:
        """Every slot: its actors, its holder (None when free) and whether that holder is alive."""
        return {slot: {"actors": list(actors), "holder": self.holders.get(slot),
                       "alive": slot in self.holders and alive(self.holders[slot])}
                for slot, actors in self.actors.items()}
