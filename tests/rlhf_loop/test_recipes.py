"""The shipped recipes load, say what their sources say, and plan offline (their hub models cannot be downloaded)."""

from pathlib import Path

import pytest

from rlhf_loop.config import load_config
from rlhf_loop.frontend.plan import describe_plan, plan_report

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"
RLHFLOW = RECIPES / "rlhflow_iterative_dpo_llama3_8b.yaml"
MAGPIE_BEST_OF_N = RECIPES / "magpie_best_of_n_armorm.yaml"
MAGPIELM_DPO = RECIPES / "magpielm_4b_dpo.yaml"
ALL = [RLHFLOW, MAGPIE_BEST_OF_N, MAGPIELM_DPO]


pytestmark = pytest.mark.usefixtures("no_network", "no_gpu_here")


def test_every_recipe_is_shipped():
    assert sorted(RECIPES.glob("*.yaml")) == sorted(ALL)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_plan_works_offline_and_shows_resources(path):
    report = plan_report(load_config(path))
    assert report.problems == []
    text = describe_plan(report)
    assert "# Ray resources" in text and f"total GPUs: {report.total_gpus:g}" in text
    for role in report.roles:
        assert f"{role.role:8s} {role.actors} actor(s) x {role.gpus_per_actor:g} GPU" in text


def test_rlhflow_iterative_dpo():
    cfg = load_config(RLHFLOW)
    assert cfg.iterations == 3 and cfg.policy.model_path == "RLHFlow/LLaMA3-SFT"
    assert cfg.data.prompts == [f"RLHFlow/iterative-prompt-v1-iter{i}-20K" for i in (1, 2, 3)]
    assert cfg.data.prompt_column == "context_messages"
    rollout = cfg.rollout
    assert (rollout.samples_per_prompt, rollout.temperature, rollout.top_p, rollout.max_tokens) == (8, 1.0, 1.0, 2048)
    assert (cfg.reward.kind, cfg.reward.model_path) == ("bradley_terry", "sfairXC/FsfairX-LLaMA3-RM-v0.1")
    assert cfg.pairs.strategy == "max_min"
    train = cfg.train
    assert (train.loss_type, train.beta, train.learning_rate, train.lr_schedule) == ("sigmoid", 0.1, 5e-7, "cosine")
    assert (train.epochs, train.zero_stage, train.reference) == (2, 2, "initial")

    report = plan_report(cfg)
    assert report.global_batch_size == 128 and report.total_gpus == 16
    assert [(r.role, r.actors, r.gpus_per_actor) for r in report.roles] == [
        ("rollout", 7, 1), ("reward", 1, 1), ("learner", 8, 1)]
    assert (report.prompts_per_iteration, report.responses_per_iteration) == (20_000, 160_000)
    assert "global batch: 128 pairs" in describe_plan(report)


def test_magpie_best_of_n_builds_data_only():
    cfg = load_config(MAGPIE_BEST_OF_N)
    assert cfg.iterations == 1 and not cfg.train.enabled
    assert (cfg.rollout.samples_per_prompt, cfg.rollout.temperature, cfg.rollout.top_p) == (5, 0.8, 1.0)
    reward = cfg.reward
    assert (reward.kind, reward.model_path, reward.trust_remote_code) == (
        "armorm", "RLHFlow/ArmoRM-Llama3-8B-v0.1", True)
    assert len(reward.objectives) == 19
    pairs = cfg.pairs
    assert (pairs.strategy, pairs.export_format, pairs.export_test_fraction, pairs.push_to_hub) == (
        "max_min", "parquet", 0.02, None)

    report = plan_report(cfg)
    assert [r.role for r in report.roles] == ["rollout", "reward"] and report.total_gpus == 8


def test_magpielm_offline_dpo():
    cfg = load_config(MAGPIELM_DPO)
    assert cfg.iterations == 1 and cfg.seed == 42
    assert (cfg.policy.model_path, cfg.pairs.dataset) == (
        "Magpie-Align/MagpieLM-4B-SFT-v0.1", "Magpie-Align/MagpieLM-DPO-Data-v0.1")
    train = cfg.train
    assert (train.beta, train.learning_rate, train.lr_schedule, train.warmup_ratio, train.epochs) == (
        0.01, 1.5e-7, "cosine", 0.1, 1)
    assert (train.micro_batch_size, train.gradient_accumulation_steps, train.num_workers) == (2, 16, 4)
    assert (train.max_length, train.max_prompt_length, train.gradient_checkpointing) == (2048, 1800, True)

    report = plan_report(cfg)
    assert report.global_batch_size == 128 and report.offline_dpo
    assert [(r.role, r.actors, r.gpus_per_actor) for r in report.roles] == [("learner", 4, 1)]
    assert "global batch: 128 pairs" in describe_plan(report)
