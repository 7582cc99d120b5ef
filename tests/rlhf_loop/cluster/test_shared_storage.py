"""The run directory must be the same directory on every node: on one node nothing is checked; on two fake nodes
(a `ray.cluster_utils.Cluster` on loopback, each node's processes working in a directory of their own, so that a
relative run directory is another directory on the second node, as an unshared disk would be) the check passes for a
directory both see and names the node that sees another."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlhf_loop.cluster import shared_storage
from rlhf_loop.cluster.shared_storage import DRIVER_TOKEN, driver_misses, exchange_tokens, nodes_to_check
from tests.ray_nodes import driver, loopback_cluster


def actors(*nodes: str) -> dict:
    return {"actors": [{"node_id": node, "address": f"10.0.0.{i}", "pid": 1} for i, node in enumerate(nodes)]}


def test_one_node_is_not_checked_and_several_are_named_with_their_roles():
    assert nodes_to_check({"rollout": actors("a"), "learner": actors("a", "a")}, driver_node="a") == {}
    assert nodes_to_check({"rollout": actors("a")}, driver_node="d") == {"a": "10.0.0.0 (Ray node a: rollout)"}
    assert nodes_to_check({"rollout": actors("a"), "learner": actors("a", "b")}, driver_node="a") == {
        "a": "10.0.0.0 (Ray node a: rollout, learner 0)", "b": "10.0.0.1 (Ray node b: learner 1)"}


def test_a_node_reads_the_drivers_token_then_writes_its_own_which_the_driver_reads(tmp_path):
    (tmp_path / DRIVER_TOKEN).write_text("d" * 32)
    assert exchange_tokens(str(tmp_path), "d" * 32, shared_storage.node_token_file("n1"), "t" * 32) is None
    assert driver_misses(tmp_path, "n1", "t" * 32) is None
    assert "the driver sees another file" in driver_misses(tmp_path, "n1", "u" * 32)
    assert "does not see the file that node wrote" in driver_misses(tmp_path, "n2", "t" * 32)
    assert "sees another directory" in exchange_tokens(str(tmp_path), "e" * 32, "x.tmp", "t")
    assert "does not see the file the driver wrote" in exchange_tokens(str(tmp_path / "gone"), "d" * 32, "x.tmp", "t")


CHECK_SCRIPT = """
import sys
from pathlib import Path
import ray
from rlhf_loop.cluster.ray_cluster import ray_running
from rlhf_loop.cluster.shared_storage import check_shared_storage
from rlhf_loop.common.errors import UserError
from rlhf_loop.config import ClusterConfig
with ray_running(ClusterConfig(address=sys.argv[1], connect_timeout_s=60)):
    node_of = {label: node["NodeID"] for node in ray.nodes() if node["Alive"] for label in node["Resources"]}
    placement = {"rollout": {"actors": [{"node_id": node_of["node_1"], "address": "127.0.0.1"}]},
                 "learner": {"actors": [{"node_id": node_of[label], "address": "127.0.0.1"}
                                        for label in ("node_0", "node_1")]}}
    try:
        print(f"shared: checked in {check_shared_storage(Path(sys.argv[2]), placement, 120):.2f} s")
    except UserError as e:
        print(f"refused: {e}")
    print("nodes", node_of["node_0"], node_of["node_1"])
"""


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """(address, the first node's working directory, the second's) of a two-node cluster on loopback."""
    first, second = tmp_path_factory.mktemp("node_0"), tmp_path_factory.mktemp("node_1")
    with loopback_cluster(first, second) as cluster:
        yield cluster.address, first, second


def check(two_nodes, directory: str) -> tuple[str, list[str]]:
    """The check run by a driver working in the first node's directory: its line, and the nodes' ids."""
    address, first, _ = two_nodes
    result = driver(CHECK_SCRIPT, address, directory, cwd=first)
    assert result.returncode == 0, result.stdout[-3000:]
    lines = result.stdout.strip().splitlines()
    print(lines[-2])
    return lines[-2], lines[-1].split()[1:]


@pytest.mark.integration
def test_a_directory_every_node_sees_passes_and_leaves_nothing_behind(two_nodes, tmp_path):
    line, _ = check(two_nodes, str(tmp_path))
    assert re.fullmatch(r"shared: checked in \d+\.\d\d s", line), line
    assert list(tmp_path.iterdir()) == []  # the tokens are gone


@pytest.mark.integration
def test_a_directory_another_node_does_not_share_is_one_line_naming_that_node(two_nodes):
    _, first, second = two_nodes
    (first / "run").mkdir()
    (second / "run").mkdir()  # the same path on the second node, but another directory
    line, (node_0, node_1) = check(two_nodes, "run")
    assert line.startswith("refused: the run directory run is not shared with node 127.0.0.1 "
                           f"(Ray node {node_1[:8]}: rollout, learner 1): that node does not see the file the driver wrote there"), line
    assert "put it on storage every node mounts at the same path" in line and node_0[:8] not in line
    assert list((first / "run").iterdir()) == [] and list((second / "run").iterdir()) == []
