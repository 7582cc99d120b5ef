"""Ray nodes on loopback for the tests that need a cluster of their own: each `ray start --block` in its own process
group (every Ray process of the node lives in it), killed group by group at the end even when a test fails, never a
global `ray stop`; and a head of Ray's own `ray.cluster_utils.Cluster` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_loop.common.network import free_port
from tests.process_groups import run_in_own_group

BIN = Path(sys.executable).parent
NODE_TIMEOUT_S = 90
# A throwaway cluster needs no token in $HOME; the driver that joins it must agree.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
ENV.pop("RAY_ADDRESS", None)


def start_node(temp_dir: Path, *args: str) -> subprocess.Popen:
    """One `ray start --block --node-ip-address=127.0.0.1` in its own process group and temp directory."""
    log = open(temp_dir.with_suffix(".log"), "w")
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", "--object-store-memory=200000000",
         f"--dashboard-agent-listen-port={free_port('127.0.0.1')}", "--min-worker-port=0", "--max-worker-port=0",
         *args],
        env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_listening(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@contextlib.contextmanager
def loopback_cluster(*node_dirs: Path) -> Iterator:
    """A `ray.cluster_utils.Cluster` whose nodes' address really is 127.0.0.1 (its head listens on loopback alone),
    one node per directory, each node's processes (and so its actors and tasks) working in its directory; node i has
    the custom resource `node_i`. Shut down however the block ends."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(shutdown_at_exit=True)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RAY_AUTH_MODE", "disabled")  # as the drivers of ENV
            for i, directory in enumerate(node_dirs):
                patch.chdir(directory)  # the node's raylet starts here, and its workers inherit it
                cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1, resources={f"node_{i}": 1})
        yield cluster
    finally:
        cluster.shutdown()


def driver(script: str, *args: str, cwd: Path | None = None, timeout_s: float = 180) -> subprocess.CompletedProcess:
    """`python -c script args...` in its own process group, killed as a group afterwards (its Ray workers belong to
    the cluster); stdout and stderr together."""
    return run_in_own_group([sys.executable, "-c", script, *args], ENV, timeout_s, "the driver", cwd=cwd)
