"""`rlhf-loop plan`: resources, derived values, memory estimates and checks, worked out offline."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_loop.config import load_config
from rlhf_loop.frontend.plan import describe_plan, plan_report
from rlhf_loop.frontend.sizing import GIB, human_bytes, size_from_name


@pytest.fixture
def config(tmp_path, tiny_policy_dir, tiny_reward_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name {i} fruits."}) + "\n" for i in range(4)))

    def load(*overrides, extra=""):
        path = tmp_path / "run.yaml"
        path.write_text(f"policy:\n  model_path: {tiny_policy_dir}\nreward:\n  model_path: {tiny_reward_dir}\n"
                        f"data:\n  prompts: [{prompts}]\n  prompts_per_iteration: 4\ndevice: cpu\n" + extra)
        return load_config(path, list(overrides))

    return load


pytestmark = pytest.mark.usefixtures("no_network", "no_gpu_here")


def role(report, name):
    (match,) = [r for r in report.roles if r.role == name]
    return match


def parameters(model_class, directory):
    return sum(p.numel() for p in model_class.from_pretrained(directory).parameters())


def test_cpu_run_reserves_no_gpus_and_counts_the_real_parameters(config, tiny_policy_dir, tiny_reward_dir):
    report = plan_report(config("rollout.samples_per_prompt=4", "train.micro_batch_size=2",
                                "train.gradient_accumulation_steps=3", "train.num_workers=2", "train.epochs=2"))
    assert report.device == "cpu" and report.total_gpus == 0
    assert [(r.role, r.actors, r.gpus_per_actor) for r in report.roles] == [
        ("rollout", 1, 0), ("reward", 1, 0), ("learner", 2, 0)]
    assert report.global_batch_size == 12
    assert (report.prompts_per_iteration, report.responses_per_iteration) == (4, 16)
    assert report.max_steps_per_iteration == 2  # 2 epochs x ceil(4 prompts / 12)

    policy = parameters(AutoModelForCausalLM, tiny_policy_dir)
    reward = parameters(AutoModelForSequenceClassification, tiny_reward_dir)
    assert [m.parameters for m in report.models] == [policy, reward]
    # float32 on CPU: weights + cpu KV cache; weights; weights + reference + gradients + two Adam moments
    assert role(report, "rollout").memory.bytes_per_actor == policy * 4 + 1 * GIB
    assert role(report, "reward").memory.bytes_per_actor == reward * 4
    assert role(report, "learner").memory.bytes_per_actor == policy * (4 + 4 + 4 + 8)
    assert report.problems == [] and report.warnings == []


@pytest.mark.parametrize("stage, expected", [
    (0, 4 + 4 + 4 + 8),  # nothing partitioned
    (1, 4 + 4 + 4 + 8 / 4),  # Adam split over 4 workers
    (2, 4 + 4 + 4 / 4 + 8 / 4),  # and gradients
    (3, 4 / 4 + 4 + 4 / 4 + 8 / 4),  # and weights; the reference stays whole
])
def test_learner_memory_follows_the_zero_stage(config, tiny_policy_dir, stage, expected):
    report = plan_report(config(f"train.zero_stage={stage}", "train.num_workers=4"))
    policy = parameters(AutoModelForCausalLM, tiny_policy_dir)
    assert role(report, "learner").memory.bytes_per_actor == pytest.approx(policy * expected, abs=4)


@pytest.mark.parametrize("overrides, reason", [
    (["train.free_reference=true"], "train.free_reference"),
    (["train.loss_type=simpo"], "reference-free"),
    (["train.lora.enabled=true"], "adapters off"),
])
def test_a_learner_without_a_reference_shows_the_memory_it_saves(config, tiny_policy_dir, overrides, reason):
    policy = parameters(AutoModelForCausalLM, tiny_policy_dir)
    kept = role(plan_report(config()), "learner").memory
    freed = role(plan_report(config(*overrides)), "learner").memory
    assert reason in freed.formula and f"saves {human_bytes(policy * 4)}" in freed.formula
    if "train.lora.enabled=true" in overrides:  # and gradients and Adam cover the adapters only
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_policy_dir),
                               LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
        adapters = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
        assert 0 < adapters < policy / 2
        assert freed.bytes_per_actor == policy * 4 + adapters * (4 + 8)
    else:
        assert freed.bytes_per_actor == kept.bytes_per_actor - policy * 4


def test_hf_engine_reserves_no_kv_cache(config, tiny_policy_dir):
    report = plan_report(config("rollout.engine=hf"))
    assert role(report, "rollout").memory.bytes_per_actor == parameters(AutoModelForCausalLM, tiny_policy_dir) * 4


def test_bfloat16_training_adds_fp32_master_weights(config, tiny_policy_dir):
    report = plan_report(config("device=cuda", "policy.dtype=bfloat16"))
    policy = parameters(AutoModelForCausalLM, tiny_policy_dir)
    assert role(report, "learner").memory.bytes_per_actor == policy * (2 + 2 + 2 + 4 + 8)


def test_cuda_layout_counts_gpus_per_role(config):
    report = plan_report(config("device=cuda", "rollout.num_engines=3", "rollout.gpus_per_engine=2",
                                "reward.num_gpus=0.5", "train.num_workers=4", "train.gpus_per_worker=0.5"))
    assert [(r.role, r.actors, r.gpus_per_actor) for r in report.roles] == [
        ("rollout", 3, 2), ("reward", 1, 0.5), ("learner", 4, 0.5)]
    assert report.total_gpus == 8.5
    text = describe_plan(report)
    assert "total GPUs: 8.5" in text and "tensor parallel" in text


def test_offline_dpo_starts_only_the_learner(config, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("{}\n")
    report = plan_report(config("device=cuda", "train.num_workers=4", "iterations=1",
                                extra=f"pairs:\n  dataset: {pairs}\n"))
    assert [(r.role, r.actors) for r in report.roles] == [("learner", 4)]
    assert report.offline_dpo and report.prompts_per_iteration is None
    assert "offline DPO" in describe_plan(report)


def test_data_building_only_has_no_learner(config):
    report = plan_report(config("train.enabled=false", "pairs.export_format=parquet"))
    assert [r.role for r in report.roles] == ["rollout", "reward"]
    assert report.warnings == [] and "global batch" not in describe_plan(report)


def test_sft_warm_start_is_listed(config, tmp_path):
    conversations = tmp_path / "sft.jsonl"
    conversations.write_text("{}\n")
    report = plan_report(config("sft.enabled=true", f"sft.dataset={conversations}"))
    assert [r.role for r in report.roles] == ["sft", "rollout", "reward", "learner"]


def test_the_description_states_resources_derivations_and_formulas(config):
    text = describe_plan(plan_report(config()))
    for expected in ("# resolved config", "model_path:", "# Ray resources", "rollout  1 actor(s) x 0 GPU",
                     "global batch: 1 pairs = micro_batch_size 1 x gradient_accumulation_steps 1 x num_workers 1",
                     "responses per iteration: 32 = prompts x K", "# memory per actor (host RAM",
                     "weights", "Adam", "# checks", "  ok"):
        assert expected in text, expected


@pytest.mark.parametrize("name, expected", [
    ("meta-llama/Meta-Llama-3-8B-Instruct", 8e9),
    ("Qwen/Qwen2.5-1.5B", 1.5e9),
    ("HuggingFaceTB/SmolLM-135M", 135e6),
    ("RLHFlow/ArmoRM-Llama3-8B-v0.1", 8e9),
    ("RLHFlow/LLaMA3-SFT", None),
    ("mistralai/Mixtral-8x7B-v0.1", None),
])
def test_sizes_guessed_from_names(name, expected):
    assert size_from_name(name) == expected


def test_a_hub_model_in_the_hf_cache_is_counted_from_its_config(config, tiny_policy_dir, tmp_path, monkeypatch):
    """Only config.json needs to be in the cache (`huggingface-cli download ID config.json`)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--acme--Llama-3-8B-Chat"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "config.json").write_text((tiny_policy_dir / "config.json").read_text())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    policy = plan_report(config("policy.model_path=acme/Llama-3-8B-Chat")).models[0]
    assert policy.source == "counted from config.json"  # not the 8B its name suggests
    assert policy.parameters == parameters(AutoModelForCausalLM, tiny_policy_dir)


def test_a_hub_model_not_cached_is_a_labelled_guess_or_unknown(config):
    report = plan_report(config("policy.model_path=nobody/Tiny-Llama-70B-Chat"))
    guess = report.models[0]
    assert guess.parameters == 70e9 and "guess" in guess.source
    report = plan_report(config("policy.model_path=nobody/no-size-here"))
    assert report.models[0].parameters is None and "unknown offline" in report.models[0].source
    assert role(report, "learner").memory.bytes_per_actor is None


def test_too_big_for_the_gpu_is_flagged(config):
    report = plan_report(config("device=cuda", "policy.model_path=nobody/Big-70B",
                                "rollout.gpu_memory_utilization=0.4"))
    assert any(w.startswith("rollout: the weights leave no room for a KV cache") for w in report.warnings)
    assert any(w.startswith("learner: about") for w in report.warnings)
    assert report.problems == []


@pytest.mark.parametrize("overrides, message", [
    (["policy.model_path=./no/such/model"], "policy.model_path './no/such/model' does not exist"),
    (["data.prompts=[/no/such/prompts.jsonl]"], "data.prompts[0] '/no/such/prompts.jsonl' does not exist"),
    (["reward.kind=function", "reward.function=/no/rewards.py:score"], "reward.function '/no/rewards.py'"),
    (["device=cuda", "rollout.gpus_per_engine=1.5"], "above 1 but not whole"),
    (["device=cuda", "rollout.num_engines=4", "rollout.gpus_per_engine=0.5",
      "rollout.gpu_memory_utilization=0.6"], "2 engines share a GPU"),
    (["device=cuda", "reward.num_gpus=0"], "reward.num_gpus is 0 on CUDA"),
    (["pairs.push_to_hub=me/pairs"], "nothing would be pushed"),
])
def test_problems_name_the_key(config, overrides, message):
    report = plan_report(config(*overrides))
    assert any(message in problem for problem in report.problems), report.problems
    assert "problem: " in describe_plan(report)


def test_one_engine_on_part_of_a_gpu_is_fine(config):
    assert plan_report(config("device=cuda", "rollout.gpus_per_engine=0.3", "rollout.gpu_memory_utilization=0.6",
                              "train.num_workers=2")).problems == []


def test_roles_packed_onto_one_gpu_must_fit_together(config):
    """docs/gpu.md's one-GPU layout: each role takes part of the GPU, so their memory adds up."""
    shares = ["device=cuda", "rollout.gpus_per_engine=0.3", "train.gpus_per_worker=0.4", "reward.num_gpus=0.2"]
    packed = "rollout, reward, learner take GPU shares below 1"
    assert not [w for w in plan_report(config(*shares, "rollout.gpu_memory_utilization=0.3")).warnings if packed in w]
    # vLLM's 90% of the GPU plus a 2B learner's ~34 GiB cannot share any GPU below 335 GiB
    report = plan_report(config(*shares, "policy.model_path=nobody/Mid-2B", "rollout.gpu_memory_utilization=0.9"))
    (warning,) = [w for w in report.warnings if packed in w]
    assert f"more than {human_bytes(report.gpu_bytes)}" in warning


def test_gpu_settings_on_a_cpu_run_are_reported_as_ignored(config):
    report = plan_report(config("rollout.gpus_per_engine=2"))
    assert report.problems == []
    assert report.warnings == ["device is cpu, so rollout.gpus_per_engine 2.0 is ignored: every actor runs on CPU"]


def test_pairs_not_exported_without_training_is_a_warning(config):
    report = plan_report(config("train.enabled=false"))
    assert any("pairs.export_format" in warning for warning in report.warnings)


def test_a_local_cluster_cannot_place_more_gpus_than_this_machine_has(config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(total_memory=24 * GIB, name="Test GPU"))
    report = plan_report(config("device=cuda"))  # rollout 1 + reward 1 + learner 1
    assert report.gpu_bytes == 24 * GIB and report.gpu_bytes_source == "this machine's Test GPU"
    assert report.problems == ["the actors ask for 3 GPUs but a local Ray cluster here has 2; they would wait "
                               "forever: set cluster.address to a larger cluster or shrink the layout"]
    assert plan_report(config("device=cuda", "cluster.address=auto")).problems == []
    assert plan_report(config("device=cuda", "train.gpus_per_worker=0.5", "reward.num_gpus=0.5")).problems == []


def test_shared_gpus_warn_that_the_nccl_weight_sync_needs_gpus_of_its_own(config):
    shares = ["device=cuda", "rollout.gpus_per_engine=0.3", "train.gpus_per_worker=0.4", "reward.num_gpus=0.2"]
    (warning,) = [w for w in plan_report(config(*shares)).warnings if "rollout.weight_sync" in w]
    assert "rollout.gpus_per_engine 0.3, train.gpus_per_worker 0.4" in warning
    assert warning.endswith("set rollout.weight_sync=object_store")
    fallback = plan_report(config(*shares, "rollout.weight_sync=object_store"))
    assert not [w for w in fallback.warnings if "rollout.weight_sync" in w]
    assert not [w for w in plan_report(config("device=cuda")).warnings if "rollout.weight_sync" in w]


def test_lengths_that_must_cut_are_warned_of_and_ones_that_fit_are_not(config):
    assert not [w for w in plan_report(config()).warnings if "train.max_" in w]
    warnings = plan_report(config("data.max_prompt_tokens=1000", "train.max_prompt_length=800",
                                  "rollout.max_tokens=2048", "train.max_length=2048")).warnings
    prompt_cut, response_cut = (next(w for w in warnings if key in w)
                                for key in ("train.max_prompt_length 800", "train.max_length 2048"))
    assert "prompts of up to 1000 tokens" in prompt_cut
    assert "make 2848, over train.max_length 2048" in response_cut
