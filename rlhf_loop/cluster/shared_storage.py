"""The run directory must be one directory for every node of a run: the learner ranks write a checkpoint that rank 0
renames into place, and the driver hashes, records and reads back what they wrote. When the roles' actors (and the
driver) span more than one Ray node, start-up checks it: the driver writes a token there that a task on each of those
nodes reads, each node writes one that the driver reads; a node that fails either way stops the run with one line
naming it, its roles and the fix. On one node there is nothing to check, and nothing is spent."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from rlhf_loop.common.actor_calls import wait
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.files import atomic_write_text

# Hidden `.NAME.tmp` files: a run directory may hold them (RUN_ENTRIES), should a killed driver leave one behind
DRIVER_TOKEN = ".shared-storage-driver.tmp"


def check_shared_storage(directory: Path, placement: dict[str, dict[str, Any]], timeout_s: float) -> float | None:
    """Every node that runs an actor of `placement` (role -> {"actors": [{"node_id", "address", ...}]}, as
    placement.json records it) sees `directory` as the driver does, both ways; the seconds the check took, or None
    when the run is on one node. `timeout_s` bounds the wait for the nodes' tasks (cluster.placement.timeout_s)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = nodes_to_check(placement, ray.get_runtime_context().get_node_id())
    if not nodes:
        return None
    began = time.perf_counter()
    driver_token = secrets.token_hex(16)
    node_tokens = {node: secrets.token_hex(16) for node in nodes}
    atomic_write_text(directory / DRIVER_TOKEN, driver_token)
    try:
        exchange = ray.remote(num_cpus=0, max_retries=0)(exchange_tokens)
        refs = [exchange.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(str(directory), driver_token, node_token_file(node), node_tokens[node]) for node in nodes]
        problems = wait(refs, timeout_s, "shared-storage check", "start-up", "cluster.placement.timeout_s")
        for (node, where), problem in zip(nodes.items(), problems, strict=True):
            problem = problem or driver_misses(directory, node, node_tokens[node])
            if problem:
                raise UserError(f"the run directory {directory} is not shared with node {where}: {problem}; put it "
                                f"on storage every node mounts at the same path (NFS, Lustre, a cloud filesystem) "
                                f"and pass that path as an absolute --run-dir")
    finally:
        for name in (DRIVER_TOKEN, *map(node_token_file, nodes)):
            (directory / name).unlink(missing_ok=True)
    return time.perf_counter() - began


def nodes_to_check(placement: dict[str, dict[str, Any]], driver_node: str) -> dict[str, str]:
    """Node id -> "ADDRESS (Ray node ID8: its roles)" for every node with an actor, when the actors and the driver
    are on more than one node; empty otherwise."""
    roles: dict[str, list[str]] = {}
    addresses: dict[str, str] = {}
    for role, info in placement.items():
        actors = info["actors"]
        for index, actor in enumerate(actors):
            roles.setdefault(actor["node_id"], []).append(f"{role} {index}" if len(actors) > 1 else role)
            addresses[actor["node_id"]] = actor["address"]
    if not roles or set(roles) == {driver_node}:
        return {}
    return {node: f"{addresses[node]} (Ray node {node[:8]}: {', '.join(names)})" for node, names in roles.items()}


def node_token_file(node: str) -> str:
    return f".shared-storage-{node[:16]}.tmp"


def exchange_tokens(directory: str, driver_token: str, name: str, token: str) -> str | None:
    """On a node: reads the driver's token in `directory`, then writes this node's as `name`; what went wrong (for
    the driver's one line), or None."""
    try:
        seen = (Path(directory) / DRIVER_TOKEN).read_text()
    except OSError as e:
        return f"that node does not see the file the driver wrote there ({e.strerror or e})"
    if seen != driver_token:
        return "that node sees another directory at that path (the driver's file there differs)"
    try:
        atomic_write_text(Path(directory) / name, token)
    except OSError as e:
        return f"that node cannot write there ({e.strerror or e})"
    return None


def driver_misses(directory: Path, node: str, token: str) -> str | None:
    """Whether the driver sees the token the node wrote; what is wrong, or None."""
    try:
        seen = (directory / node_token_file(node)).read_text()
    except OSError as e:
        return f"the driver does not see the file that node wrote there ({e.strerror or e})"
    return None if seen == token else "the driver sees another file where that node wrote (it differs)"
