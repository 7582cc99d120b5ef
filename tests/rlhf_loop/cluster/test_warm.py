"""Warm actors without Ray: a slot's fingerprint changes with everything that shapes its actors and with nothing
else, and claims keep two live runs apart while a dead run's claim is taken over."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhf_loop.cluster.placement import role_layout
from rlhf_loop.cluster.warm import Claims, fingerprint, warm_slots
from rlhf_loop.config import load_config


@pytest.fixture
def config_file(tmp_path) -> Path:
    model = tmp_path / "policy"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    reward = tmp_path / "reward_model"
    reward.mkdir()
    (reward / "config.json").write_text("{}")
    path = tmp_path / "run.yaml"
    path.write_text(f"policy: {{model_path: {model}}}\nreward: {{model_path: {reward}}}\n"
                    f"data: {{prompts: [prompts.jsonl]}}\ncluster: {{address: auto, keep_warm: true}}\n")
    return path


def slots(config_file: Path, *overrides: str, device: str = "cpu") -> dict[str, str]:
    cfg = load_config(config_file, ["device=cpu", *overrides])
    return {role: slot.name for role, slot in warm_slots(cfg, cfg.policy, device, role_layout(cfg, device)).items()}


def test_the_rollout_engines_and_the_reward_actor_are_kept_warm_each_actor_named(config_file):
    cfg = load_config(config_file, ["device=cpu", "rollout.num_engines=2"])
    found = warm_slots(cfg, cfg.policy, "cpu", role_layout(cfg, "cpu"))
    assert sorted(found) == ["reward", "rollout"]  # never the learner
    rollout = found["rollout"]
    assert rollout.name.startswith("rollout-") and rollout.actors == (f"{rollout.name}-0", f"{rollout.name}-1")
    assert found["reward"].actors == (f"{found['reward'].name}-0",)


def test_the_same_settings_give_the_same_slots(config_file):
    assert slots(config_file) == slots(config_file)


def test_what_only_steers_the_calls_keeps_the_engines(config_file):
    before = slots(config_file)
    after = slots(config_file, "rollout.temperature=0.7", "rollout.samples_per_prompt=4", "rollout.shard_size=3",
                  "rollout.weight_sync=object_store", "iterations=7", "train.learning_rate=0.1")
    assert after == before


@pytest.mark.parametrize("override", ["rollout.cpu_kv_cache_gib=2", "rollout.engine=hf", "seed=1",
                                      "rollout.max_model_len=99", "policy.dtype=bfloat16",
                                      "cluster.max_actor_restarts=1", "cluster.threads_per_actor=1",
                                      "cluster.placement.rollout.resource=gpu_node"])
def test_what_shapes_an_engine_makes_new_ones_and_leaves_the_reward_actor(config_file, override):
    before, after = slots(config_file), slots(config_file, override)
    assert after["rollout"] != before["rollout"]
    if not override.startswith("cluster.max") and not override.startswith("cluster.threads"):
        assert after["reward"] == before["reward"]


def test_the_reward_section_and_the_device_shape_the_reward_actor(config_file):
    before = slots(config_file)
    assert slots(config_file, "reward.batch_size=3")["reward"] != before["reward"]
    assert slots(config_file, "reward.batch_size=3")["rollout"] == before["rollout"]
    assert slots(config_file, device="cuda") != before


def test_a_changed_model_file_makes_new_actors(config_file, tmp_path):
    before = slots(config_file)
    weights = tmp_path / "policy" / "model.safetensors"
    weights.write_bytes(b"other weights")
    os.utime(weights, ns=(1, 1))
    after = slots(config_file)
    assert after["rollout"] != before["rollout"] and after["reward"] == before["reward"]


def test_a_code_file_counts_by_its_content(tmp_path):
    code = tmp_path / "reward_fn.py"
    code.write_text("def score(*args):\n    return 1.0\n")
    reference = f"{code}:score"
    first = fingerprint({"function": reference})
    os.utime(code, ns=(5, 5))  # touched, not changed
    assert fingerprint({"function": reference}) == first
    code.write_text("def score(*args):\n    return 2.0\n")
    assert fingerprint({"function": reference}) != first
    assert fingerprint({"model": "org/hub-model"}) == fingerprint({"model": "org/hub-model"})  # no file: the name


def test_offline_dpo_keeps_nothing_warm(config_file):
    assert slots(config_file, "pairs.dataset=pairs.jsonl", "iterations=1") == {}


def test_keep_warm_refuses_colocation_and_a_warm_start(config_file):
    cfg = load_config(config_file, ["device=cpu"])
    cfg.cluster.colocate = True
    assert any(problem.startswith("cluster.keep_warm does not combine with cluster.colocate")
               for problem in cfg.problems())
    cfg.cluster.colocate, cfg.sft.enabled = False, True
    assert any(problem.startswith("cluster.keep_warm keeps engines that were built from pi_0")
               for problem in cfg.problems())


# ---- claims ----------------------------------------------------------------------------------------------------

def alive_jobs(*jobs: str):
    return lambda job: job in jobs


def test_a_live_run_keeps_its_slots_from_another():
    claims = Claims()
    assert claims.take({"rollout-a": ["rollout-a-0"], "reward-b": ["reward-b-0"]}, "01", alive_jobs("01", "02")) == {}
    busy = claims.take({"rollout-a": ["rollout-a-0"], "reward-c": ["reward-c-0"]}, "02", alive_jobs("01", "02"))
    assert busy == {"rollout-a": "01"}
    assert "reward-c" not in claims.holders  # all or nothing: the free slot was not taken either


def test_a_dead_runs_claim_is_taken_over():
    claims = Claims()
    claims.take({"rollout-a": ["rollout-a-0"]}, "01", alive_jobs("01"))
    assert claims.take({"rollout-a": ["rollout-a-0"]}, "02", alive_jobs("02")) == {}  # job 01's driver is gone
    assert claims.holders == {"rollout-a": "02"}


def test_a_released_slot_is_free_and_keeps_its_actors():
    claims = Claims()
    claims.take({"rollout-a": ["rollout-a-0", "rollout-a-1"]}, "01", alive_jobs("01", "02"))
    assert claims.release("02") == [] and claims.release("01") == ["rollout-a"]
    assert claims.take({"rollout-a": ["rollout-a-0", "rollout-a-1"]}, "02", alive_jobs("01", "02")) == {}
    assert claims.listing(alive_jobs("02")) == {
        "rollout-a": {"actors": ["rollout-a-0", "rollout-a-1"], "holder": "02", "alive": True}}
    claims.release("02")
    assert claims.listing(alive_jobs()) == {
        "rollout-a": {"actors": ["rollout-a-0", "rollout-a-1"], "holder": None, "alive": False}}
    claims.forget("rollout-a")
    assert claims.listing(alive_jobs()) == {}


def test_a_run_may_take_its_own_slots_again():
    claims = Claims()
    claims.take({"rollout-a": ["rollout-a-0"]}, "01", alive_jobs("01"))
    assert claims.take({"rollout-a": ["rollout-a-0"]}, "01", alive_jobs("01")) == {}
