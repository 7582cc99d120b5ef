"""Warm actors on a real Ray head (`ray start --head` on loopback, in its own process group and temp dir, killed as a
group at the end even when a test fails): tiny runs with cluster.keep_warm one after another. The second takes the
first's rollout engine and reward actor (the same pids) and samples exactly what the first, started on new ones,
sampled; a run while another job holds the claim starts actors of its own; a run SIGKILLed mid-iteration is resumed on
the warm actors (its dead claim taken over) and ends as an uninterrupted run does; `rlhf-loop cluster release` stops
them. The tests run in file order, each on what the ones before it left on the cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_loop.common.faults import KILL_AT_ENV
from rlhf_loop.common.files import read_jsonl
from rlhf_loop.common.network import free_port
from tests.process_groups import kill_group, run_in_own_group
from tests.ray_nodes import ENV, NODE_TIMEOUT_S, start_node, wait_listening

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 900  # a run here takes a minute or two on 2 cores; fifteen means it hangs

HOLD_CLAIM = """
import sys, time
from rlhf_loop.cluster.placement import role_layout
from rlhf_loop.cluster.ray_cluster import start_ray
from rlhf_loop.cluster.warm_registry import take_warm_slots
from rlhf_loop.config import load_config
cfg = load_config(sys.argv[1])
start_ray(cfg.cluster)
print("claimed" if take_warm_slots(cfg, cfg.policy, cfg.device, role_layout(cfg, cfg.device)) else "busy", flush=True)
time.sleep(3600)
"""

CLAIMS_LAPSED = """
import sys, time, ray
from rlhf_loop.cluster.ray_cluster import start_ray
from rlhf_loop.cluster.warm_registry import _registry
from rlhf_loop.config import load_config
start_ray(load_config(sys.argv[1]).cluster)
deadline = time.monotonic() + 120
while any(info["alive"] for info in ray.get(_registry(create=False).listing.remote()).values()):
    assert time.monotonic() < deadline, "a dead driver's job still reads alive"
    time.sleep(1)
print("lapsed")
"""


@pytest.fixture(scope="module")
def address():
    root = Path(tempfile.mkdtemp(prefix="rlw_", dir="/tmp"))  # short: Ray's socket paths live under it
    port = free_port("127.0.0.1")
    head = start_node(root / "head", "--head", f"--port={port}", "--include-dashboard=false")
    try:
        wait_listening("127.0.0.1", port, NODE_TIMEOUT_S)
        yield f"127.0.0.1:{port}"
    finally:
        kill_group(head)  # the warm actors, detached, are the head's processes: they go with it
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_policy_dir, tiny_reward_dir, address):
    directory = tmp_path_factory.mktemp("warm")
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name {i} fruits, please."}) + "\n" for i in range(16)))
    path = directory / "run.yaml"
    path.write_text(f"""
iterations: 2
device: cpu
policy: {{model_path: {tiny_policy_dir}}}
data: {{prompts: [{prompts}], prompts_per_iteration: 8, max_prompt_tokens: 64}}
rollout: {{samples_per_prompt: 2, max_tokens: 8, shard_size: 4}}
reward: {{model_path: {tiny_reward_dir}, shard_size: 4}}
train: {{micro_batch_size: 2, save_steps: 2, max_length: 96, max_prompt_length: 64, learning_rate: 1.0e-3}}
cluster: {{address: "{address}", keep_warm: true}}
""")
    return path


def rlhf_loop(*args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, **({KILL_AT_ENV: kill_at} if kill_at else {})}
    return run_in_own_group([sys.executable, "-m", "rlhf_loop.frontend.cli", *args], env, RUN_TIMEOUT_S,
                            f"rlhf-loop {' '.join(args)}")


def run(config: Path, run_dir: Path, *overrides: str) -> Path:
    result = rlhf_loop("run", str(config), *overrides, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:]
    return run_dir


def pids(run_dir: Path) -> dict[str, list[int]]:
    placement = json.loads((run_dir / "placement.json").read_text())
    return {role: [actor["pid"] for actor in info["actors"]] for role, info in placement.items()}


def reused(run_dir: Path) -> dict[str, list[bool | None]]:
    placement = json.loads((run_dir / "placement.json").read_text())
    return {role: [actor.get("reused") for actor in info["actors"]] for role, info in placement.items()}


def results(run_dir: Path, iterations: int = 2) -> dict:
    """What the run sampled, scored and trained, iteration by iteration (times left out)."""
    found = {}
    for i in range(1, iterations + 1):
        iteration = run_dir / f"iter_{i:03d}"
        found[i] = {"rollouts": [r for shard in sorted((iteration / "rollouts").glob("*.jsonl")) for r in read_jsonl(shard)],
                    "pairs": read_jsonl(iteration / "pairs.jsonl")}
    found["metrics"] = [{k: v for k, v in m.items() if not k.startswith("time/")}
                        for m in read_jsonl(run_dir / "metrics.jsonl")][:iterations]
    if iterations == 2:
        found["weights"] = load_file(run_dir / "iter_002" / "policy" / "model.safetensors")
    return found


def same(a: dict, b: dict) -> bool:
    weights = all(a["weights"][k].equal(b["weights"][k]) for k in a["weights"]) if "weights" in a else True
    return weights and {k: v for k, v in a.items() if k != "weights"} == {k: v for k, v in b.items() if k != "weights"}


def claims_lapse(config: Path) -> None:
    """Once no live job holds a warm slot (Ray marks a killed driver's job dead within seconds)."""
    lapsed = run_in_own_group([sys.executable, "-c", CLAIMS_LAPSED, str(config)], ENV, 300, "the claims' check")
    assert lapsed.stdout.strip().endswith("lapsed"), lapsed.stdout[-3000:]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def first(config, tmp_path_factory):
    return run(config, tmp_path_factory.mktemp("runs") / "first")


@pytest.fixture(scope="module")
def second(config, first, tmp_path_factory):
    return run(config, tmp_path_factory.mktemp("runs") / "second")


def test_the_first_run_starts_warm_actors_and_leaves_them_alive(first):
    assert reused(first) == {"rollout": [False], "reward": [False], "learner": [None]}
    log = (first / "logs" / "driver.log").read_text()
    assert "the rollout and reward actors stay alive on the cluster" in log
    assert all(alive(pid) for pid in pids(first)["rollout"] + pids(first)["reward"])  # after the run (the head is here)


def test_the_second_run_takes_the_first_runs_actors_and_samples_what_new_ones_did(first, second):
    assert reused(second) == {"rollout": [True], "reward": [True], "learner": [None]}
    assert pids(second)["rollout"] == pids(first)["rollout"] and pids(second)["reward"] == pids(first)["reward"]
    assert pids(second)["learner"] != pids(first)["learner"]  # the learner is the run's own
    assert "(kept warm: 1 of 1 reused)" in (second / "logs" / "driver.log").read_text()
    # The engine ended the first run holding its last weights; the second run's first sample is pi_0's again, and
    # its sync group with the new learner formed: everything equals the first run's, which started on new actors.
    assert same(results(second), results(first))


def test_a_run_while_another_job_holds_the_claim_starts_its_own_actors(config, first, second, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CLAIM, str(config)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        result = rlhf_loop("run", str(config), "iterations=1", "--run-dir", str(tmp_path / "beside"))
        assert result.returncode == 0, result.stdout[-3000:]
        assert "in use by a running job" in result.stdout
    finally:
        kill_group(holder)  # SIGKILL: its claim is left behind, for the next run to take over
    beside = tmp_path / "beside"
    assert reused(beside) == {"rollout": [None], "reward": [None], "learner": [None]}  # not kept warm
    assert pids(beside)["rollout"] != pids(first)["rollout"]
    assert same(results(beside, iterations=1), results(first, iterations=1))
    assert all(alive(pid) for pid in pids(first)["rollout"])  # the warm engine was not touched


def test_a_crashed_run_resumes_on_the_warm_actors_and_ends_as_an_uninterrupted_run(config, first, tmp_path):
    run_dir = tmp_path / "crashed"
    claims_lapse(config)  # Ray has marked the killed holder's job dead
    result = rlhf_loop("run", str(config), "--run-dir", str(run_dir), kill_at="iter_002/rollouts/shard_00001")
    assert result.returncode == -signal.SIGKILL, result.stdout[-3000:]
    assert reused(run_dir)["rollout"] == [True]  # it took over the claim the killed holder left
    claims_lapse(config)
    result = rlhf_loop("resume", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:]
    assert reused(run_dir)["rollout"] == [True] and pids(run_dir)["rollout"] == pids(first)["rollout"]
    assert same(results(run_dir), results(first))


def test_release_stops_the_warm_actors(config, address, first):
    result = rlhf_loop("cluster", "release", "--address", address)
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("rlhf-loop: stopped ") == 2, result.stdout[-3000:]  # the rollout and reward slots
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in pids(first)["rollout"] + pids(first)["reward"]):
        assert time.monotonic() < deadline, "a released warm actor's process is still there"
        time.sleep(1)
    again = rlhf_loop("cluster", "release", "--address", address)
    assert "rlhf-loop: no warm actors on this cluster" in again.stdout, again.stdout[-3000:]
