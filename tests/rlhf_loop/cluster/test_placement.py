"""Where each role goes, worked out without Ray: the placement groups and bundles, colocation's shared GPUs and its
refusals, and the one line that explains a group the cluster could not place."""

from __future__ import annotations

import pytest

from rlhf_loop.config import load_config
from rlhf_loop.common.errors import ConfigError
from rlhf_loop.cluster.placement import (
    CPU_SHARE,
    LABEL_SHARE,
    Group,
    colocation_problems,
    engines_start_first,
    role_layout,
    unplaceable,
)


@pytest.fixture
def config(tmp_path):
    """A run config from overrides (no model is loaded: the layout needs none)."""
    path = tmp_path / "run.yaml"
    path.write_text("policy: {model_path: p}\nreward: {model_path: r}\ndata: {prompts: [prompts.jsonl]}\n")
    return lambda *overrides: load_config(path, list(overrides))


def test_each_role_gets_its_own_group_with_a_bundle_an_actor(config):
    layout = role_layout(config("rollout.num_engines=2", "train.num_workers=3",
                                "cluster.placement.rollout.resource=node_b",
                                "cluster.placement.learner.strategy=strict_spread"), "cpu")
    groups = {group.name: group for group in layout.groups}
    assert set(groups) == {"rollout", "reward", "learner"}
    assert groups["rollout"].bundles == ({"CPU": CPU_SHARE, "node_b": LABEL_SHARE},) * 2  # never an empty bundle
    assert groups["reward"].bundles == ({"CPU": CPU_SHARE},) and groups["reward"].ray_strategy == "PACK"
    assert groups["learner"].ray_strategy == "STRICT_SPREAD" and len(groups["learner"].bundles) == 3
    assert [(slot.group, slot.bundle, slot.num_gpus) for slot in layout.slots["learner"]] == [
        ("learner", 0, 0), ("learner", 1, 0), ("learner", 2, 0)]


def test_on_cuda_the_bundles_hold_each_roles_gpus(config):
    layout = role_layout(config("rollout.gpus_per_engine=2", "reward.num_gpus=0.5", "train.num_workers=2"), "cuda")
    bundles = {group.name: group.bundles for group in layout.groups}
    assert bundles["rollout"] == ({"CPU": CPU_SHARE, "GPU": 2.0},)  # a tensor-parallel engine's GPUs, on one node
    assert bundles["reward"] == ({"CPU": CPU_SHARE, "GPU": 0.5},)
    assert bundles["learner"] == ({"CPU": CPU_SHARE, "GPU": 1.0},) * 2


def test_offline_dpo_reserves_the_learner_only(config):
    layout = role_layout(config("pairs.dataset=pairs.jsonl", "data.prompts=[]", "iterations=1"), "cpu")
    assert [group.name for group in layout.groups] == ["learner"] and set(layout.slots) == {"learner"}


def test_colocated_engines_share_each_learner_ranks_gpu(config):
    layout = role_layout(config("cluster.colocate=true", "rollout.num_engines=2", "train.num_workers=2",
                                "cluster.placement.learner.resource=gpu_node"), "cuda")
    (group,) = layout.groups  # the reward runs a network, so it shares GPU 0
    assert group.name == "colocated" and set(group.roles) == {"rollout", "reward", "learner"}
    assert group.bundles == ({"CPU": 3 * CPU_SHARE, "GPU": 1.0, "gpu_node": 3 * LABEL_SHARE},
                             {"CPU": 2 * CPU_SHARE, "GPU": 1.0, "gpu_node": 2 * LABEL_SHARE})
    assert [slot.bundle for slot in layout.slots["rollout"]] == [0, 1] == [s.bundle for s in layout.slots["learner"]]
    assert [slot.bundle for slot in layout.slots["reward"]] == [0]
    for index, bundle in enumerate(group.bundles):  # Ray's shares of a GPU never add up to more than it
        shares = [slot.num_gpus for slots in layout.slots.values() for slot in slots if slot.bundle == index]
        assert 0.99 <= sum(shares) <= bundle["GPU"]


def test_a_reward_without_a_network_keeps_its_own_group_when_colocated(config):
    layout = role_layout(config("cluster.colocate=true", "reward.kind=function", "reward.model_path=null",
                                "reward.function=rlhf_loop.toy.task:gold_reward"), "cuda")
    assert [(group.name, group.roles) for group in layout.groups] == [("reward", ("reward",)),
                                                                      ("colocated", ("rollout", "learner"))]
    assert [slot.num_gpus for slot in layout.slots["rollout"] + layout.slots["learner"]] == [0.5, 0.5]


def test_colocation_is_refused_on_cpu_with_one_line(config):
    (problem,) = colocation_problems(config("cluster.colocate=true"), "cpu")
    assert problem.startswith("cluster.colocate shares GPUs") and "\n" not in problem
    assert [group.name for group in role_layout(config("cluster.colocate=true"), "cpu").groups] == [
        "rollout", "reward", "learner"]  # the plan still shows the layout it would use without colocation


@pytest.mark.parametrize("overrides, fragment", [
    (["rollout.engine=hf"], "needs vLLM's sleep mode"),
    (["rollout.num_engines=2"], "rollout.num_engines (2) must equal train.num_workers (1)"),
    (["rollout.gpus_per_engine=2"], "tensor parallel"),
    (["cluster.placement.rollout.resource=node_b"], "leave cluster.placement.rollout unset"),
    (["train.enabled=false"], "needs rollout engines and a learner"),
    (["rollout.weight_sync=collective"], "NCCL cannot hold both ends"),
    (["rollout.max_staleness=1"], "set rollout.max_staleness: 0"),
])
def test_colocation_refuses_what_it_cannot_share(config, overrides, fragment):
    (problem,) = colocation_problems(config("cluster.colocate=true", "rollout.weight_sync=object_store", *overrides),
                                     "cuda")
    assert fragment in problem


def test_a_colocated_run_on_cpu_stops_at_preflight(config, no_gpu_here, monkeypatch):
    from rlhf_loop.frontend import preflight
    from rlhf_loop.common.errors import UserError

    monkeypatch.setattr(preflight, "check_model", lambda *args: pytest.fail("the refusal comes first"))
    with pytest.raises(UserError, match=r"^cluster.colocate shares GPUs .* device is cpu; set cluster.colocate: "
                                        r"false on a machine without CUDA \(`rlhf-loop plan CONFIG`"):
        preflight.preflight(config("cluster.colocate=true", "device=cpu"))


def test_an_unknown_strategy_is_refused_naming_the_key(config):
    with pytest.raises(ConfigError, match="cluster.placement.reward.strategy must be one of pack, spread, "
                                          "strict_pack, strict_spread, got 'scatter'"):
        config("cluster.placement.reward.strategy=scatter")


NODES = [{"CPU": 1.0, "node_a": 1.0}, {"CPU": 1.0, "node_b": 1.0}]


def group(strategy="pack", resource=None, bundles=1, gpus=0.0):
    bundle = {"CPU": CPU_SHARE, **({"GPU": gpus} if gpus else {}), **({resource: LABEL_SHARE} if resource else {})}
    return Group("learner", ("learner",), strategy, resource, (bundle,) * bundles)


@pytest.mark.parametrize("layout, fragment", [
    (group(resource="node_c"), "no node has the resource 'node_c' (cluster.placement.learner.resource); start the "
                               "node with `ray start ... --resources='{\"node_c\": 1}'`, or fix the name"),
    (group(gpus=1.0), "no node has room for one actor (CPU 0.01, GPU 1); add such a node"),
    (group("strict_spread", "node_a", bundles=2), "strict_spread puts each of its 2 actors on its own node, and "
                                                  "1 node(s) with node_a can hold one; set "
                                                  "cluster.placement.learner.strategy to spread"),
    (group("strict_pack", bundles=200), "strict_pack puts its 200 actors on one node, and no node holds CPU 2"),
    (group("spread", bundles=2), "the resources are taken"),
])
def test_an_unplaced_group_is_explained_in_one_line(layout, fragment):
    message = unplaceable(layout, NODES, timeout_s=60)
    assert message.startswith("the cluster did not place the learner within 60 s") and "\n" not in message
    assert fragment in message


def test_plan_shows_the_groups_and_warns_when_colocated_roles_overfill_the_gpu(tmp_path, tiny_policy_dir,
                                                                               tiny_reward_dir, no_network,
                                                                               no_gpu_here):
    from rlhf_loop.frontend.plan import describe_plan, plan_report

    path = tmp_path / "run.yaml"
    path.write_text(f"policy: {{model_path: {tiny_policy_dir}}}\nreward: {{model_path: {tiny_reward_dir}}}\n"
                    f"data: {{prompts: [prompts.jsonl]}}\ndevice: cuda\ncluster: {{colocate: true, address: auto}}\n")
    report = plan_report(load_config(path, ["rollout.gpu_memory_utilization=1.0"]))
    assert report.total_gpus == 1  # learner, engine and reward share the one GPU bundle
    text = describe_plan(report)
    assert "colocated pack on any node: 1 x {CPU 0.03, GPU 1}" in text
    assert "rollout: bundle(s) 0, 0.3333 GPU each" in text
    assert any(w.startswith("rollout, reward, learner share a GPU (cluster.colocate") for w in report.warnings)


@pytest.mark.parametrize(("overrides", "device", "first"), [
    ((), "cuda", False),  # a GPU per actor: nothing shared, every role starts at once
    (("rollout.gpus_per_engine=0.5",), "cuda", True),
    (("train.gpus_per_worker=0.4",), "cuda", True),
    (("reward.num_gpus=0.2",), "cuda", True),
    (("cluster.colocate=true", "rollout.weight_sync=object_store", "rollout.max_staleness=0"), "cuda", True),
    (("rollout.gpus_per_engine=0.5",), "cpu", False),  # no GPU to share
])
def test_vllm_starts_first_wherever_it_may_share_a_gpu(config, overrides, device, first):
    assert engines_start_first(config(*overrides), device) is first
