"""Actors started early are recorded like ones started at their turn; and the roles on a real two-node Ray cluster
on loopback: a head node with the custom resource node_a and a worker node
with node_b, each `ray start --block` in its own process group and temp dir (killed, group by group, at the end even
when a test fails; never a global `ray stop`). The tiny loop joins it with cluster.address, the rollout engine pinned
to node_b, the reward actor to node_a, and a learner of two DeepSpeed ranks spread over both nodes (gloo between
them); placement.json must show every actor where the config put it."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rlhf_loop.cluster import roles
from rlhf_loop.common.background import in_background
from rlhf_loop.config import load_config
from rlhf_loop.common.network import free_port
from rlhf_loop.cluster.placement import role_layout
from rlhf_loop.rundir.manifest import Manifest, RunDir
from rlhf_loop.common.files import read_jsonl
from rlhf_loop.driver.stages import Run
from tests.process_groups import kill_group
from tests.ray_nodes import ENV, NODE_TIMEOUT_S, start_node, wait_listening

class StartedActor:
    def __init__(self, pid: int):
        self.pid = pid

    def placement(self) -> list[dict]:
        return [{"address": "127.0.0.1", "node_id": "n0", "pid": self.pid}]


def small_config(tmp_path: Path, *overrides: str):
    path = tmp_path / "run.yaml"
    path.write_text("policy: {model_path: p}\nreward: {model_path: r}\ndata: {prompts: [prompts.jsonl]}\n")
    return load_config(path, ["device=cpu", *overrides])


def test_actors_started_early_are_waited_for_and_recorded(tmp_path, monkeypatch, caplog):
    cfg = small_config(tmp_path)
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    run = Run(cfg, run_dir, Manifest.load(run_dir))
    started = roles.Started({"rollout": StartedActor(11), "reward": StartedActor(12), "learner": StartedActor(13)},
                            {"rollout": 9.5, "reward": 4.25, "learner": 5.0}, role_layout(cfg, "cpu"))
    monkeypatch.setattr(roles, "launch", lambda *args: pytest.fail("the actors were started a second time"))
    checked = []
    monkeypatch.setattr(roles, "check_shared_storage", lambda *args: checked.append(args))
    caplog.set_level("INFO", logger="rlhf_loop.cluster.roles")
    early = in_background(lambda: started, name="test")
    rollout, reward, learner = roles.start_actors(run, cfg.policy, "cpu", early)
    assert (rollout.pid, reward.pid, learner.pid) == (11, 12, 13)
    placement = json.loads((run_dir.root / "placement.json").read_text())
    assert {role: info["startup_s"] for role, info in placement.items()} == {"rollout": 9.5, "reward": 4.25,
                                                                              "learner": 5.0}
    assert placement["learner"]["actors"] == [{"address": "127.0.0.1", "node_id": "n0", "pid": 13, "bundle": 0}]
    assert "start-up: rollout 9.5 s, reward 4.2 s, learner 5.0 s; every actor ready" in caplog.text
    assert checked == [(run_dir.root, placement, cfg.cluster.placement.timeout_s)]  # what placement.json records


def test_the_time_since_launch_counts_from_the_process_start():
    before = time.time()
    script = "import time\nfrom rlhf_loop.cluster.roles import seconds_since_launch\nprint(seconds_since_launch(), time.time())"
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])})
    age, now = map(float, child.stdout.split())
    assert now - before - 0.5 < age <= now - before + 0.02  # the clock's ticks are 10 ms


def test_a_warm_start_makes_the_policy_so_its_actors_cannot_start_early(tmp_path):
    assert roles.launch_early(small_config(tmp_path, "sft.enabled=true", "sft.dataset=d"), "cpu") is None


RUN_TIMEOUT_S = 600  # a run here takes about two minutes; ten means it hangs

NODES_SCRIPT = """
import json, sys, time, ray
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[2])
while True:
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    if len(nodes) == 2 or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps(nodes))
"""


@pytest.fixture(scope="module")
def cluster():
    """(address, {"node_a": node id, "node_b": node id}) of a head and a worker node on loopback."""
    root = Path(tempfile.mkdtemp(prefix="rl2n_", dir="/tmp"))  # short: Ray's socket paths live under it
    port = free_port("127.0.0.1")
    address = f"127.0.0.1:{port}"
    nodes = [start_node(root / "head", "--head", f"--port={port}", "--include-dashboard=false",
                        '--resources={"node_a": 1}')]
    try:
        wait_listening("127.0.0.1", port, NODE_TIMEOUT_S)
        nodes.append(start_node(root / "worker", f"--address={address}", '--resources={"node_b": 1}'))
        listed = subprocess.run([sys.executable, "-c", NODES_SCRIPT, address, str(NODE_TIMEOUT_S)], env=ENV,
                                capture_output=True, text=True, timeout=NODE_TIMEOUT_S + 60)
        resources = json.loads(listed.stdout.strip().splitlines()[-1]) if listed.returncode == 0 else {}
        assert len(resources) == 2, f"the cluster did not come up with two nodes: {listed.stderr[-2000:]}"
        labels = {label: node for node, owned in resources.items() for label in ("node_a", "node_b") if label in owned}
        yield address, labels
    finally:
        for node in nodes:
            kill_group(node)
        shutil.rmtree(root, ignore_errors=True)


def rlhf_loop(*args: str) -> subprocess.CompletedProcess:
    """The CLI in its own process group, killed as a group afterwards (its Ray workers belong to the cluster)."""
    process = subprocess.Popen([sys.executable, "-m", "rlhf_loop.frontend.cli", *args], env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=30)
        pytest.fail(f"rlhf-loop {' '.join(args)} did not finish in {RUN_TIMEOUT_S} s:\n{output[-3000:]}")
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return subprocess.CompletedProcess(process.args, process.returncode, output)


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_policy_dir, tiny_reward_dir):
    directory = tmp_path_factory.mktemp("two_nodes")
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name {i} fruits, please."}) + "\n" for i in range(8)))
    path = directory / "run.yaml"
    path.write_text(f"""
iterations: 1
device: cpu
policy: {{model_path: {tiny_policy_dir}}}
data: {{prompts: [{prompts}], prompts_per_iteration: 8, max_prompt_tokens: 64}}
rollout: {{samples_per_prompt: 2, max_tokens: 8}}
reward: {{model_path: {tiny_reward_dir}}}
train: {{num_workers: 2, micro_batch_size: 1, save_steps: 4, max_length: 96, max_prompt_length: 64,
        learning_rate: 1.0e-3}}
cluster:
  placement:
    rollout: {{resource: node_b}}
    reward: {{resource: node_a}}
    learner: {{strategy: strict_spread}}
""")
    return path


@pytest.fixture(scope="module")
def finished_run(cluster, config, tmp_path_factory):
    address, _ = cluster
    run_dir = tmp_path_factory.mktemp("runs") / "two_nodes"
    result = rlhf_loop("run", str(config), f"cluster.address={address}", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:]
    return run_dir


@pytest.mark.integration
def test_each_pinned_role_ran_on_the_node_its_resource_names(cluster, finished_run):
    _, labels = cluster
    placement = json.loads((finished_run / "placement.json").read_text())
    assert placement["rollout"]["placement"]["resource"] == "node_b"
    assert [actor["node_id"] for actor in placement["rollout"]["actors"]] == [labels["node_b"]]
    assert [actor["node_id"] for actor in placement["reward"]["actors"]] == [labels["node_a"]]
    assert all(actor["address"] and actor["pid"] > 0 for info in placement.values() for actor in info["actors"])


@pytest.mark.integration
def test_a_learner_of_two_ranks_trains_across_both_nodes(cluster, finished_run):
    _, labels = cluster
    learner = json.loads((finished_run / "placement.json").read_text())["learner"]
    assert learner["placement"]["strategy"] == "strict_spread"
    assert {actor["node_id"] for actor in learner["actors"]} == set(labels.values())  # one rank on each node
    (metrics,) = read_jsonl(finished_run / "metrics.jsonl")
    assert metrics["pairs/count"] > 0 and math.isfinite(metrics["dpo/loss"]) and metrics["dpo/loss"] > 0
    assert (finished_run / "iter_001" / "policy" / "model.safetensors").is_file()


@pytest.mark.integration
def test_a_layout_the_cluster_cannot_place_is_one_line(cluster, config, tmp_path):
    address, _ = cluster
    start = time.monotonic()
    result = rlhf_loop("run", str(config), f"cluster.address={address}", "cluster.placement.learner.resource=node_c",
                       "cluster.placement.timeout_s=3", "--run-dir", str(tmp_path / "unplaceable"))
    assert result.returncode != 0 and time.monotonic() - start < 120
    assert ("the cluster did not place the learner within 3 s: no node has the resource 'node_c' "
            "(cluster.placement.learner.resource)") in result.stdout, result.stdout[-3000:]
    assert not (tmp_path / "unplaceable" / "placement.json").exists()  # no actor started
