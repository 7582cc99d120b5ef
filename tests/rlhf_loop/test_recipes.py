"""The shipped recipes load through the real RunConfig and plan offline (their hub models cannot be downloaded); each
value a recipe says comes from a published source holds the published value (one table below, keyed by the
source's tag in the recipe's own comments); and what the comments derive from those values (global batches, the
cuts DPO makes, what fits in which context) agrees with the config and with `rlhf-loop plan`."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from rlhf_loop.config import RunConfig, load_config
from rlhf_loop.frontend.plan import PlanReport, describe_plan, plan_report

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"
RLHFLOW = RECIPES / "rlhflow_iterative_dpo_llama3_8b.yaml"
MAGPIE_BEST_OF_N = RECIPES / "magpie_best_of_n_armorm.yaml"
MAGPIELM_DPO = RECIPES / "magpielm_4b_dpo.yaml"
ALL = [RLHFLOW, MAGPIE_BEST_OF_N, MAGPIELM_DPO]
OURS = "ours"  # the tag of this project's own choices: every other tag names a source


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


# ---- the published values, and the tags that name their sources -----------------------------------------------------

# Per recipe, per key: (the tag of the source the recipe cites for it, the value that source gives). The sources are
# listed, with the file or page each tag stands for, in the header of each recipe ("Where the numbers come from").
PUBLISHED: dict[Path, dict[str, tuple[str, object]]] = {
    RLHFLOW: {
        "iterations": ("loop", 3),
        "data.prompts": ("loop", [f"RLHFlow/iterative-prompt-v1-iter{i}-20K" for i in (1, 2, 3)]),
        "data.prompt_column": ("gen", "context_messages"),
        "data.max_prompt_tokens": ("dpo", 1000),
        "rollout.samples_per_prompt": ("loop", 8),
        "rollout.temperature": ("loop", 1.0),
        "rollout.top_p": ("gen", 1.0),
        "rollout.max_tokens": ("gen", 2048),
        "reward.kind": ("rm", "bradley_terry"),
        "reward.model_path": ("rm", "sfairXC/FsfairX-LLaMA3-RM-v0.1"),
        "pairs.strategy": ("loop", "max_min"),
        "train.loss_type": ("loop", "sigmoid"),
        "train.beta": ("dpo", 0.1),
        "train.reference": ("loop", "initial"),
        "train.learning_rate": ("loop", 5e-7),
        "train.lr_schedule": ("loop", "cosine"),
        "train.warmup_ratio": ("dpo", 0.3),  # 100 warmup steps, as a ratio: see CLAIMS
        "train.weight_decay": ("dpo", 0.01),
        "train.epochs": ("dpo", 2),
        "train.num_workers": ("loop", 8),
        "train.micro_batch_size": ("dpo", 1),
        "train.gradient_accumulation_steps": ("dpo", 16),
        "train.max_length": ("dpo", 2048),
        "train.max_prompt_length": ("dpo", 1000),
        "train.zero_stage": ("loop", 2),
        "train.gradient_checkpointing": ("dpo", True),
    },
    MAGPIE_BEST_OF_N: {
        "data.prompts": ("card", ["Magpie-Align/Magpie-Llama-3.1-Pro-DPO-100K-v0.1"]),
        "rollout.samples_per_prompt": ("card", 5),
        "rollout.temperature": ("card", 0.8),
        "reward.kind": ("card", "armorm"),
        "reward.model_path": ("card", "RLHFlow/ArmoRM-Llama3-8B-v0.1"),
        "reward.trust_remote_code": ("rm", True),
        "reward.objectives": ("rm", [
            "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
            "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
            "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness", "beavertails-is_safe",
            "prometheus-score", "argilla-overall_quality", "argilla-judge_lm", "code-complexity", "code-style",
            "code-explanation", "code-instruction-following", "code-readability"]),
        "pairs.strategy": ("card", "max_min"),
        "pairs.export_test_fraction": ("brief", 0.02),
    },
    MAGPIELM_DPO: {
        "seed": ("card", 42),
        "policy.model_path": ("card", "Magpie-Align/MagpieLM-4B-SFT-v0.1"),
        "policy.dtype": ("card", "auto"),  # bf16 on CUDA
        "pairs.dataset": ("card", "Magpie-Align/MagpieLM-DPO-Data-v0.1"),
        "pairs.dataset_split": ("card", "train"),
        "data.max_prompt_tokens": ("card", 8192),  # the SFT sequence_len
        "train.beta": ("card", 0.01),
        "train.reference": ("card", "initial"),
        "train.learning_rate": ("card", 1.5e-7),
        "train.lr_schedule": ("card", "cosine"),
        "train.warmup_ratio": ("card", 0.1),
        "train.weight_decay": ("hf", 0.0),
        "train.max_grad_norm": ("hf", 1.0),
        "train.epochs": ("card", 1),
        "train.num_workers": ("card", 4),
        "train.micro_batch_size": ("card", 2),
        "train.gradient_accumulation_steps": ("card", 16),
        "train.max_length": ("card", 2048),
        "train.max_prompt_length": ("card", 1800),
        "train.gradient_checkpointing": ("card", True),
        "wandb.mode": ("card", "offline"),  # the card reports to wandb; offline until you log in
    },
}

TAG = re.compile(r"\[(\w+)(?::[^\]]*)?\]")  # [card], [ours: as a ratio]


def source_header(path: Path) -> set[str]:
    """The tags the header defines: its lines "#   [tag]  what the tag stands for"."""
    return {match[1] for line in path.read_text().splitlines() if (match := re.match(r"#\s+\[(\w+)\]\s", line))}


def key_tags(path: Path) -> dict[str, set[str]]:
    """{dotted key: the tags in its comments}: those on its lines (a list's continuation lines too) and in the
    comment lines just above it inside its section."""
    tags: dict[str, set[str]] = {}
    stack: list[str] = []
    pending: set[str] = set()
    for line in path.read_text().splitlines():
        if line.startswith(" ") and line.lstrip().startswith("#"):
            pending |= set(TAG.findall(line))
            continue
        if not line.strip() or line.startswith("#"):
            continue
        code, _, comment = line.partition("#")
        if key := re.match(r"( *)([A-Za-z_]\w*):", code):
            stack = [*stack[: len(key[1]) // 2], key[2]]
        tags.setdefault(".".join(stack), set()).update(set(TAG.findall(comment)) | pending)
        pending = set()
    return tags


def value(cfg: RunConfig, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_every_tag_is_a_listed_source(path):
    used = set().union(*key_tags(path).values())
    assert OURS in source_header(path)
    assert used <= source_header(path), f"tags without their source in the header: {used - source_header(path)}"


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_every_sourced_value_is_the_published_one(path):
    cfg, tags, published = load_config(path), key_tags(path), PUBLISHED[path]
    sourced = {key for key, found in tags.items() if found - {OURS}}
    assert sourced == set(published), "a value with a source tag but no published value here, or the reverse"
    for key, (source, expected) in published.items():
        assert source in tags[key], f"{key}: the recipe does not name [{source}] as its source"
        assert value(cfg, key) == expected, key


# ---- what the comments derive from the values --------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    recipe: Path
    says: str  # quoted from the recipe's comments (whitespace aside): the claim stays tied to its words
    holds: Callable[[RunConfig, PlanReport], bool]


def batch(cfg: RunConfig) -> tuple[int, int, int]:
    return cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, cfg.train.num_workers


CLAIMS = [
    Claim(RLHFLOW, "global batch 1 x 16 x 8 = 128",
          lambda cfg, plan: batch(cfg) == (1, 16, 8) and plan.global_batch_size == 128),
    Claim(MAGPIELM_DPO, "global batch 2 x 16 x 4 = 128",
          lambda cfg, plan: batch(cfg) == (2, 16, 4) and plan.global_batch_size == 128),
    Claim(RLHFLOW, "100 warmup steps of about 312 (20K pairs x 2 epochs / 128)",
          lambda cfg, plan: (cfg.data.prompts_per_iteration, cfg.train.epochs, plan.global_batch_size) == (20000, 2, 128)
          and abs(plan.max_steps_per_iteration - 312) <= 2 and abs(cfg.train.warmup_ratio * 312 - 100) <= 10),
    Claim(RLHFLOW, "max_prompt_tokens: 1000 # = the DPO max_prompt_length",
          lambda cfg, plan: cfg.data.max_prompt_tokens == cfg.train.max_prompt_length == 1000),
    Claim(RLHFLOW, "holds a 1000-token prompt and a 2048-token response; Llama-3 reads 8K",
          lambda cfg, plan: cfg.data.max_prompt_tokens + cfg.rollout.max_tokens <= cfg.reward.max_length <= 8192),
    Claim(MAGPIE_BEST_OF_N, "2048 + 4096 tokens stay inside Llama-3's 8K context",
          lambda cfg, plan: (cfg.data.max_prompt_tokens, cfg.rollout.max_tokens) == (2048, 4096)
          and cfg.data.max_prompt_tokens + cfg.rollout.max_tokens <= min(cfg.reward.max_length, 8192)),
    Claim(RLHFLOW, "128 prompts per engine per shard (7 x 128)",
          lambda cfg, plan: cfg.rollout.shard_size == cfg.rollout.num_engines * 128 == 7 * 128),
    Claim(MAGPIE_BEST_OF_N, "128 prompts per engine per shard",
          lambda cfg, plan: cfg.rollout.shard_size == cfg.rollout.num_engines * 128),
    Claim(RLHFLOW, "7 GPUs of 16 sample; 8 train; 1 scores",
          lambda cfg, plan: plan.total_gpus == 16 and [(r.role, r.actors * r.gpus_per_actor) for r in plan.roles]
          == [("rollout", 7), ("reward", 1), ("learner", 8)]),
    Claim(MAGPIE_BEST_OF_N, "7 GPUs sample, 1 scores",
          lambda cfg, plan: [(r.role, r.actors * r.gpus_per_actor) for r in plan.roles]
          == [("rollout", 7), ("reward", 1)] and not cfg.train.enabled),
    Claim(RLHFLOW, "a fresh 20K prompt set each iteration",
          lambda cfg, plan: len(cfg.data.prompts) == cfg.iterations and cfg.data.prompts_per_iteration == 20000),
    Claim(MAGPIELM_DPO, "1 iteration on 4 GPUs. No generation and no reward model run",
          lambda cfg, plan: cfg.iterations == 1 and plan.offline_dpo and plan.total_gpus == 4
          and [r.role for r in plan.roles] == ["learner"]),
]


def words(text: str) -> str:
    return " ".join(text.replace("#", " ").split())


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: f"{c.recipe.stem}: {c.says[:40]}")
def test_what_the_comments_derive_holds(claim):
    assert words(claim.says) in words(claim.recipe.read_text()), "the recipe no longer says this: update the claim"
    cfg = load_config(claim.recipe)
    assert claim.holds(cfg, plan_report(cfg)), claim.says


# Per recipe: what its comments say DPO cuts, quoted, and which cuts that is.
STATED_CUTS = {
    RLHFLOW: ("long responses lose their end (EOS included) in DPO, as in run_dpo.py. Each iteration counts the cut "
              "pairs (pairs/truncated_response; pairs/truncated_prompt stays 0", {"response"}),
    MAGPIELM_DPO: ("`rlhf-loop plan` warns of the prompt cut", {"prompt"}),
    MAGPIE_BEST_OF_N: ("Data building only: no DPO step", set()),
}


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_the_cuts_the_comments_state_are_the_cuts_plan_warns_of(path):
    says, cuts = STATED_CUTS[path]
    assert words(says) in words(path.read_text()), "the recipe no longer says this: update STATED_CUTS"
    warnings = plan_report(load_config(path)).warnings
    warned = ({"prompt"} if any("cut to train.max_prompt_length" in w for w in warnings) else set()) | (
        {"response"} if any("lose their end" in w for w in warnings) else set())
    assert warned == cuts
