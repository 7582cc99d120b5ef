"""Ray start-up and device choice: the one place the driver touches Ray directly."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rlhf_loop.cluster.warm import NAMESPACE as WARM_NAMESPACE
from rlhf_loop.common import console
from rlhf_loop.common.background import in_background
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.network import is_loopback

def resolve_device(device: str) -> str:
    """`auto` means CUDA when this machine has a GPU, else CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def ray_running(cluster_cfg) -> Iterator[Path]:
    """Ray for the block, joined or started here and shut down however the block ends; yields this session's log
    directory (for `link_ray_logs` once the run directory exists). Under cluster.keep_warm the warm actors this run
    held are given back first, and stay alive (`rlhf_loop.cluster.warm_registry`)."""
    try:
        yield start_ray(cluster_cfg)
    finally:
        try:
            if cluster_cfg.keep_warm:
                from rlhf_loop.cluster.warm_registry import leave_warm_actors

                leave_warm_actors(cluster_cfg.address)
        finally:
            stop_ray()


def start_ray(cluster_cfg) -> Path:
    """Join the cluster at `cluster.address` (or $RAY_ADDRESS), or start a local one; returns the session's log
    directory. In a quiet process the actors' output stays in Ray's log files instead of coming to the console."""
    import ray

    address = cluster_cfg.address or os.environ.get("RAY_ADDRESS")
    if cluster_cfg.keep_warm and not address:
        raise UserError("cluster.keep_warm keeps actors alive between runs on a Ray cluster that outlives them, and "
                        "this run would start its own; start one with `ray start --head` and set cluster.address=auto")
    threads = actor_threads(cluster_cfg, address, os.environ)
    init = functools.partial(
        ray.init,
        address=address,
        num_cpus=cluster_cfg.num_cpus if address is None else None,
        _node_ip_address=cluster_cfg.node_ip_address,
        include_dashboard=False,
        # keep_warm: the warm actors and their placement groups are named in one namespace every such run joins
        namespace=WARM_NAMESPACE if cluster_cfg.keep_warm else None,
        log_to_driver=not console.is_quiet(),
        configure_logging=True,
        logging_level="WARNING",
        # a joined cluster's workers were started by its own raylets: the job's environment reaches them
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}} if address and threads else None,
    )
    if address is None:
        # A local throwaway cluster needs no token file in $HOME; a cluster we join keeps its own auth settings.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # The raylet and every worker it starts inherit this (Ray sets OMP_NUM_THREADS only where it is unset)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        context = init()  # in this thread: Ray ties the processes it starts to the thread that starts them
    else:
        context = join(address, init, cluster_cfg.connect_timeout_s)
    return Path(context.address_info["session_dir"]) / "logs"


def actor_threads(cluster_cfg, address: str | None, environ) -> int | None:
    """Torch threads per actor (cluster.threads_per_actor): the config's number; else, on a local cluster,
    $OMP_NUM_THREADS when set, else the cores the cluster has. The stages take turns (sampling, then training), so the
    busy actor may use every core; Ray's own default, one thread for an actor that reserves less than a core, made
    SmolLM2's iteration 1.4x slower on 2 cores (docs/performance.md). None: a joined cluster's own setting."""
    if cluster_cfg.threads_per_actor:
        return cluster_cfg.threads_per_actor
    if address:
        return None
    if environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(environ["OMP_NUM_THREADS"])
    if cluster_cfg.num_cpus:
        return cluster_cfg.num_cpus
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not on macOS


def join(address: str, init: Callable[[], Any], timeout_s: float) -> Any:
    """`init()` (ray.init against the running cluster at `address`) within `timeout_s` in all, or one line: Ray
    itself retries a head that answers but does not serve it for minutes. The join runs in a daemon thread, so a
    driver that gives up exits without waiting for it (joining starts no process here)."""
    deadline = time.monotonic() + timeout_s
    if threading.current_thread() is threading.main_thread():
        # What ray.init does in the main thread only: SIGTERM ends the driver through its `finally` blocks
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    loopback = address != "auto" and is_loopback(check_reachable(address, timeout_s))
    joining = in_background(functools.partial(_init_keeping_loopback, init) if loopback else init, name="ray-join")
    try:
        return joining.result(timeout=max(deadline - time.monotonic(), 0.0))
    except concurrent.futures.TimeoutError:
        raise UserError(f"cannot join the Ray cluster at {address} within {timeout_s:g} s: something answers there, "
                        f"but Ray did not connect; check that cluster.address is the Ray head's (what `ray start "
                        f"--head` printed), or raise cluster.connect_timeout_s") from None
    except ConnectionError as e:  # address "auto" with no cluster running here, or a head that went away
        raise UserError(f"cannot join the Ray cluster at {address} ({str(e).splitlines()[0][:160]}); start it with "
                        f"`ray start --head`, or unset cluster.address to start a local one") from None


def _init_keeping_loopback(init: Callable[[], Any]) -> Any:
    """`init()` with a loopback head address kept as written. Ray replaces it by this host's interface address
    before connecting (`resolve_ip_for_localhost`): right for a head of `ray start`, which ignores a loopback
    --node-ip-address and listens on every interface, but a head whose node address really is 127.0.0.1 (as
    `ray.cluster_utils.Cluster` starts one) listens on loopback alone, and the driver waited there for minutes.
    Loopback reaches both; the driver then takes the address of the Ray node on this machine."""
    from ray._private import services

    rewrite = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host
    try:
        return init()
    finally:
        services.resolve_ip_for_localhost = rewrite


def link_ray_logs(ray_logs: Path, log_dir: Path) -> None:
    """RUN_DIR/logs/ray_SESSION -> Ray's log directory of this session (every actor's worker-*-PID.out and .err;
    placement.json has the actors' pids). Only this node's are there: on a cluster, each node keeps its own."""
    link = log_dir / f"ray_{ray_logs.parent.name}"
    if ray_logs.is_dir() and not link.exists():
        link.symlink_to(ray_logs, target_is_directory=True)
    logging.getLogger(__name__).info("the actors' logs (Ray's): %s", link if link.exists() else ray_logs)


def check_reachable(address: str, timeout_s: float) -> str:
    """The host of a `host:port` (or ray://host:port) cluster address, once something answers there; otherwise one
    line instead of Ray's silent retries."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"cluster.address {address!r} is not host:port; write e.g. 10.0.0.5:6379 or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return host
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address} within {timeout_s:g} s ({e.strerror or e}); "
                        f"check cluster.address against what `ray start --head` printed") from None


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
