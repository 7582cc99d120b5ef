"""Joining or starting Ray: a cluster that cannot be reached, or that answers but never lets Ray connect, is one line
within cluster.connect_timeout_s; a joined cluster keeps its own auth; a loopback head address is kept as written
(ray.init is recorded in the unit tests). The integration tests join real heads on 127.0.0.1, of `ray start` and of
Ray's own `ray.cluster_utils.Cluster`, and run the CLI against addresses that do not serve Ray."""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf_loop.cluster import ray_cluster as cluster
from rlhf_loop.config import ClusterConfig
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.network import free_port
from tests.cli_runs import rlhf_loop
from tests.process_groups import kill_group
from tests.ray_nodes import NODE_TIMEOUT_S, driver, loopback_cluster, start_node, wait_listening


@pytest.fixture
def recorded_init(monkeypatch):
    import ray

    from ray._private import services

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    def init(**kwargs):  # with what Ray would make of a loopback address at this moment
        calls.append({**kwargs, "loopback_becomes": services.resolve_ip_for_localhost("127.0.0.1")})
        return SimpleNamespace(address_info={"session_dir": "/tmp/ray/session_x"})

    monkeypatch.setattr(ray, "init", init)
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "OMP_NUM_THREADS"):  # set first: monkeypatch restores them as they were
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    sigterm = signal.getsignal(signal.SIGTERM)  # a join sets the driver's, as ray.init does
    yield calls
    signal.signal(signal.SIGTERM, sigterm)


def test_an_unreachable_cluster_is_one_line_within_the_timeout():
    port = free_port("127.0.0.1")  # nobody listens there
    start = time.monotonic()
    with pytest.raises(UserError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}") as error:
        cluster.check_reachable(f"127.0.0.1:{port}", timeout_s=2.0)
    assert time.monotonic() - start < 5 and "\n" not in str(error.value)


def test_a_malformed_address_is_refused():
    with pytest.raises(UserError, match="not host:port"):
        cluster.check_reachable("head-node", timeout_s=2.0)


def test_actors_use_every_core_of_a_local_cluster_unless_told_otherwise(recorded_init, monkeypatch):
    import os

    cluster.start_ray(ClusterConfig(num_cpus=3))
    assert os.environ["OMP_NUM_THREADS"] == "3" and recorded_init[-1]["runtime_env"] is None
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's own setting wins over the default
    cluster.start_ray(ClusterConfig(num_cpus=3))
    assert os.environ["OMP_NUM_THREADS"] == "5"
    cluster.start_ray(ClusterConfig(num_cpus=3, threads_per_actor=2))  # ... and the config's over both
    assert os.environ["OMP_NUM_THREADS"] == "2"
    monkeypatch.delenv("OMP_NUM_THREADS")
    cluster.start_ray(ClusterConfig())
    assert os.environ["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))
    assert ClusterConfig(threads_per_actor=0).problems() == [
        "cluster.threads_per_actor must be >= 1 (or null for the default), got 0"]


def test_a_joined_cluster_gets_threads_only_when_the_config_names_them():
    assert cluster.actor_threads(ClusterConfig(), "10.0.0.5:6379", {"OMP_NUM_THREADS": "4"}) is None
    assert cluster.actor_threads(ClusterConfig(threads_per_actor=8), "10.0.0.5:6379", {}) == 8


def test_a_local_cluster_needs_no_token_but_a_joined_one_keeps_its_auth(recorded_init, monkeypatch):
    import os

    from ray._private import services

    rewrite = services.resolve_ip_for_localhost

    cluster.start_ray(ClusterConfig(num_cpus=2))
    assert recorded_init[-1]["address"] is None and recorded_init[-1]["num_cpus"] == 2
    assert os.environ["RAY_AUTH_MODE"] == "disabled"

    monkeypatch.delenv("RAY_AUTH_MODE")
    with socket.socket() as head:  # something listening, as a head node would
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        cluster.start_ray(ClusterConfig(address=address))
    assert "RAY_AUTH_MODE" not in os.environ
    assert recorded_init[-1]["address"] == address and recorded_init[-1]["num_cpus"] is None
    # Ray would rewrite the loopback head address to this host's interface address, where a head of
    # ray.cluster_utils.Cluster does not listen: it is kept; the driver takes the address of the node on this machine
    assert recorded_init[-1]["loopback_becomes"] == "127.0.0.1" and recorded_init[-1]["_node_ip_address"] is None
    assert services.resolve_ip_for_localhost is rewrite  # Ray's own again afterwards


def test_ray_address_from_the_environment_is_joined(recorded_init, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    cluster.start_ray(ClusterConfig())
    assert recorded_init[-1]["address"] == "auto"


def test_keep_warm_joins_its_namespace_and_refuses_a_cluster_that_would_end_with_the_run(recorded_init, monkeypatch):
    with pytest.raises(UserError, match=r"^cluster.keep_warm keeps actors alive between runs on a Ray cluster that "
                                        r"outlives them.*`ray start --head` and set cluster.address=auto$"):
        cluster.start_ray(ClusterConfig(keep_warm=True))
    assert recorded_init == []  # nothing started
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    cluster.start_ray(ClusterConfig(keep_warm=True))
    assert recorded_init[-1]["namespace"] == "rlhf_loop_warm"  # where the warm actors are named
    cluster.start_ray(ClusterConfig())
    assert recorded_init[-1]["namespace"] is None  # a job's own anonymous one


def test_a_join_stuck_inside_ray_init_ends_with_one_line_at_the_timeout(recorded_init, monkeypatch):
    import ray

    never = threading.Event()
    monkeypatch.setattr(ray, "init", lambda **kwargs: never.wait())  # as Ray retrying a head that does not serve it
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(UserError, match=f"cannot join the Ray cluster at {address} within 0.5 s") as error:
            cluster.start_ray(ClusterConfig(address=address, connect_timeout_s=0.5))
    assert 0.5 <= time.monotonic() - start < 2 and "\n" not in str(error.value)
    assert "cluster.connect_timeout_s" in str(error.value)
    never.set()


JOIN_SCRIPT = """
import os, sys, time
began = time.monotonic()
import ray
from rlhf_loop.cluster.ray_cluster import ray_running
from rlhf_loop.config import ClusterConfig
with ray_running(ClusterConfig(address=sys.argv[1], connect_timeout_s=60)):
    joined = time.monotonic() - began
    task = ray.remote(num_cpus=0)(lambda: ray.get_runtime_context().get_node_id())
    print("ran on", ray.get(task.remote(), timeout=120), "joined in", round(joined, 2), "s (import ray included)")
"""


def joins(address: str, node_id: str) -> None:
    """A driver joins `address` through start_ray and runs a task on the cluster's node."""
    joined = driver(JOIN_SCRIPT, address)
    assert joined.returncode == 0 and f"ran on {node_id}" in joined.stdout, joined.stdout[-3000:]
    print(joined.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_a_driver_joins_a_ray_start_head_on_loopback():
    root = Path(tempfile.mkdtemp(prefix="rlj_", dir="/tmp"))  # short: Ray's socket paths live under it
    port = free_port("127.0.0.1")
    head = start_node(root / "head", "--head", f"--port={port}", "--include-dashboard=false")
    try:
        wait_listening("127.0.0.1", port, NODE_TIMEOUT_S)
        listed = driver(NODE_SCRIPT, f"127.0.0.1:{port}")
        assert listed.returncode == 0, listed.stdout[-3000:]
        joins(f"127.0.0.1:{port}", listed.stdout.split()[-1])
    finally:
        kill_group(head)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.integration
def test_a_driver_joins_a_head_of_ray_cluster_utils_that_listens_on_loopback_alone(tmp_path):
    with loopback_cluster(tmp_path) as two:
        assert two.address.startswith("127.0.0.1:")
        joins(two.address, two.head_node.node_id)


# Waits until the head's node is registered (a driver joining a head still starting waits for it)
NODE_SCRIPT = """
import sys, time, ray
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)
while not [node for node in ray.nodes() if node["Alive"]]:
    time.sleep(0.3)
print(next(node["NodeID"] for node in ray.nodes() if node["Alive"]))
"""


@pytest.fixture
def cli_config(tmp_path, tiny_policy_dir, tiny_reward_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name 3 fruits."}\n')
    path = tmp_path / "run.yaml"
    path.write_text(f"device: cpu\npolicy: {{model_path: {tiny_policy_dir}}}\nreward: {{model_path: {tiny_reward_dir}}}\n"
                    f"data: {{prompts: [{prompts}]}}\n")
    return path


def refused(cli_config, tmp_path, address: str, timeout_s: float) -> tuple[str, float]:
    """`rlhf-loop run` against `address`: it must end with exit 2 and one line; that line, and how long it took."""
    start = time.monotonic()
    result = rlhf_loop("run", str(cli_config), f"cluster.address={address}", f"cluster.connect_timeout_s={timeout_s}",
                       "--run-dir", str(tmp_path / "run"))
    elapsed = time.monotonic() - start
    errors = [line for line in result.stdout.splitlines() if line.startswith("rlhf-loop: error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stdout[-3000:]
    assert not (tmp_path / "run").exists()
    print(f"{address}: exit 2 after {elapsed:.1f} s (interpreter and imports included): {errors[0]}")
    return errors[0], elapsed


@pytest.mark.integration
def test_an_address_nobody_listens_on_is_one_line_in_seconds(cli_config, tmp_path):
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    error, elapsed = refused(cli_config, tmp_path, address, timeout_s=3)
    assert f"cannot reach the Ray cluster at {address} within 3 s" in error
    assert elapsed < 60  # the interpreter, imports and the config check on a busy machine; Ray alone retries longer


@pytest.mark.integration
def test_an_address_that_answers_but_is_no_ray_head_is_one_line_at_the_timeout(cli_config, tmp_path):
    with socket.socket() as not_ray:  # accepts connections and never says a word: ray.init retries it for minutes
        not_ray.bind(("127.0.0.1", 0))
        not_ray.listen()
        address = f"127.0.0.1:{not_ray.getsockname()[1]}"
        error, elapsed = refused(cli_config, tmp_path, address, timeout_s=3)
    assert f"cannot join the Ray cluster at {address} within 3 s" in error and "cluster.connect_timeout_s" in error
    assert 3 <= elapsed < 60
