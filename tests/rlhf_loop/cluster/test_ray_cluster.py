"""Joining or starting Ray: a cluster that cannot be reached is one line within seconds; a joined cluster keeps its
own auth; a loopback head makes the driver use loopback too (no Ray process is started here: ray.init is recorded)."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest

from rlhf_loop.cluster import ray_cluster as cluster
from rlhf_loop.config import ClusterConfig
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.network import free_port


@pytest.fixture
def recorded_init(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    def init(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(address_info={"session_dir": "/tmp/ray/session_x"})

    monkeypatch.setattr(ray, "init", init)
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # set first, so that monkeypatch restores them as they were
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return calls


def test_an_unreachable_cluster_is_one_line_within_the_timeout():
    port = free_port("127.0.0.1")  # nobody listens there
    start = time.monotonic()
    with pytest.raises(UserError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}") as error:
        cluster.check_reachable(f"127.0.0.1:{port}", timeout_s=2.0)
    assert time.monotonic() - start < 5 and "\n" not in str(error.value)


def test_a_malformed_address_is_refused():
    with pytest.raises(UserError, match="not host:port"):
        cluster.check_reachable("head-node")


def test_a_local_cluster_needs_no_token_but_a_joined_one_keeps_its_auth(recorded_init, monkeypatch):
    import os

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
    assert recorded_init[-1]["_node_ip_address"] == "127.0.0.1"  # the head is on loopback: so is the driver


def test_ray_address_from_the_environment_is_joined(recorded_init, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    cluster.start_ray(ClusterConfig())
    assert recorded_init[-1]["address"] == "auto"
