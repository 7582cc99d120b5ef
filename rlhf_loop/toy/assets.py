"""The toy task's assets, built once and cached: tokenizer and random-init policy, SFT data and the SFT policy
(pi_0), prompts, and a two-stage Bradley-Terry reward model, under `ToyTaskConfig.dir` with fixed names (see
`ToyAssets`). `ensure_toy_assets` is what a run calls; the task itself is in `rlhf_loop.toy.task`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf_loop.common.console import say
from rlhf_loop.common.files import atomic_directory, atomic_write_jsonl, exclusive_lock
from rlhf_loop.toy.task import (
    VARIANTS,
    AnswerNoise,
    make_preference_pairs,
    make_prompts,
    make_sft_examples,
    tokenizer_corpus,
)

# Bump when the recipe changes in a way the config does not show (word lists, templates, training code), so every
# cache built by an older recipe is rebuilt.
RECIPE_VERSION = 2

@dataclass
class ToyTaskConfig:
    enabled: bool = False  # build (or reuse) the toy assets at the start of a run
    dir: str = ".cache/toy_task"  # cache directory; its layout is fixed (see ToyAssets), rebuilt when the recipe changes
    seed: int = 0  # drives data generation, model initialisation, SFT and reward-model training
    # short_lists (2-5 words asked; pi_0 already covers the answers: its best of 8 about 0.89) | long_lists (6-10
    # words asked, the SFT answers give at most half: pi_0's best of 8 at most 0.5, better answers reached in steps)
    variant: str = "short_lists"
    num_train_prompts: int = 3072  # prompts the loop samples from (data.prompts)
    num_eval_prompts: int = 128  # held-out prompts for eval/gold_mean (eval.prompts), disjoint from the train prompts
    num_sft_examples: int = 2048  # SFT conversations (prompt + imperfect answer), drawn over the train prompts
    sft_filler_rate: float = 0.3  # chance that a word of an SFT answer is a filler ("stuff", "etc")
    sft_off_category_rate: float = 0.1  # chance that a word of an SFT answer comes from another category
    sft_count_miss_rate: float = 0.0  # chance that an SFT answer has one word too many or too few
    num_rm_category_pairs: int = 4096  # first reward-model stage: clean answer vs one word from another category
    rm_category_epochs: int = 4  # passes over those; the category check only clicks when trained on its own first
    num_rm_pairs: int = 4096  # second stage: gold-labelled pairs of every kind of mistake
    rm_edited_fraction: float = 0.4  # share of second-stage pairs whose two answers differ in one word only
    rm_category_fraction: float = 0.4  # share of second-stage pairs that repeat the first stage's kind
    num_rm_eval_pairs: int = 512  # held-out second-stage pairs (on the eval prompts) for the reward model's accuracy
    vocab_size: int = 1024  # upper bound for the byte-level BPE vocabulary (the task's text fills about 1000)
    hidden_size: int = 64  # width of the tiny policy and reward model (heads of size 32, as vLLM on CPU needs)
    num_layers: int = 2  # decoder layers of the tiny policy and reward model
    # Passes over the SFT conversations: about 2300 steps. The category words click somewhere after 600-1200 steps,
    # and where depends on float rounding (on AVX2 kernels 12 epochs left pi_0's gold at 0.34 where AVX-512 gave
    # 0.55); 18 give every path time to click and settle (0.57-0.60 on both, over asset seeds 0-2).
    sft_epochs: int = 18
    sft_learning_rate: float = 3e-3  # peak of a cosine schedule; high because the model is tiny and random-init
    sft_batch_size: int = 16  # conversations per SFT optimizer step
    rm_epochs: int = 4  # passes over the second-stage pairs; 2 left the accuracy on pi_0's samples at 0.75-0.94 by seed
    rm_learning_rate: float = 5e-4  # both stages; the reward model starts from the SFT policy, whose features it keeps
    rm_batch_size: int = 16  # pairs per reward-model optimizer step

    def sft_noise(self) -> AnswerNoise:
        return AnswerNoise(self.sft_filler_rate, self.sft_off_category_rate, self.sft_count_miss_rate,
                           max_share=VARIANTS[self.variant].sft_max_share)

    def problems(self) -> list[str]:
        return [] if self.variant in VARIANTS else [
            f"toy_task.variant {self.variant!r} is unknown; use one of {', '.join(VARIANTS)}"]


@dataclass(frozen=True)
class ToyAssets:
    """Paths inside the cache directory; the names are fixed so configs can point at them."""

    base_policy: Path  # random-init tiny policy with the tokenizer: where an in-run SFT stage starts
    sft_policy: Path  # base_policy after SFT on sft_data: pi_0 of the loop
    sft_data: Path  # sft.jsonl: {"messages": [...]} with the final assistant turn as target
    train_prompts: Path  # train_prompts.jsonl: {"prompt": [...], "category": str, "count": int}
    eval_prompts: Path  # eval_prompts.jsonl: same columns, held out
    reward_model: Path  # Bradley-Terry reward model trained on gold-labelled pairs, in two stages
    rm_category_pairs: Path  # rm_category_pairs.jsonl: first-stage pairs {"prompt": [...], "chosen", "rejected"}
    rm_pairs: Path  # rm_pairs.jsonl: second-stage pairs, same columns
    rm_eval_pairs: Path  # rm_eval_pairs.jsonl: held-out pairs on the eval prompts
    stamp: Path  # build.json: recipe hash and what the build measured (reward-model accuracy, timings)


def toy_assets(directory: str | Path) -> ToyAssets:
    """The asset paths under `directory` (whether or not they are built yet)."""
    directory = Path(directory)
    return ToyAssets(
        base_policy=directory / "base_policy",
        sft_policy=directory / "sft_policy",
        sft_data=directory / "sft.jsonl",
        train_prompts=directory / "train_prompts.jsonl",
        eval_prompts=directory / "eval_prompts.jsonl",
        reward_model=directory / "reward_model",
        rm_category_pairs=directory / "rm_category_pairs.jsonl",
        rm_pairs=directory / "rm_pairs.jsonl",
        rm_eval_pairs=directory / "rm_eval_pairs.jsonl",
        stamp=directory / "build.json",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Building and caching the assets
# ---------------------------------------------------------------------------------------------------------------------


# Toy prompts render to about 25 tokens and answers to about 15: these bounds never cut anything.
_MAX_PROMPT_LENGTH = 64
_MAX_LENGTH = 128


def ensure_toy_assets(cfg: ToyTaskConfig) -> ToyAssets:
    """The toy assets under cfg.dir, built first if missing or built by another recipe.

    A build runs in a child process (DeepSpeed, used by SFT, sets process-wide state that must not leak into the
    caller or into the Ray workers it starts later), writes into a staging directory beside cfg.dir and renames it
    into place, so a crash never leaves a half-built cache. Concurrent callers serialise on a lock file: one
    builds, the others wait and then find the cache ready.
    """
    assets = toy_assets(cfg.dir)
    key = recipe_key(cfg)
    if _built_key(assets.stamp) == key:
        return assets
    directory = Path(cfg.dir)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory.parent / f".{directory.name}.lock"):
        if _built_key(assets.stamp) == key:
            return assets
        say(f"rlhf-loop: building the toy task's assets into {cfg.dir} (once; a few minutes on a CPU)")
        with atomic_directory(directory) as staging:  # a crash never leaves a half-built cache
            _build_in_child_process(cfg, staging)
    for problem in calibration_problems(assets):
        say(f"rlhf-loop: warning: the toy assets in {cfg.dir} are off their calibration: {problem}; results will "
            f"differ from the README's (rebuild with another toy_task.seed, or report it)")
    return assets


def calibration_problems(assets: ToyAssets) -> list[str]:
    """What the build measured outside the band the README's numbers assume (see rlhf_loop.toy.calibration)."""
    from rlhf_loop.toy.calibration import Calibration

    measured = json.loads(assets.stamp.read_text()).get("calibration")  # None: a stamp that measured nothing
    return Calibration(**measured).problems() if measured else []


def recipe_key(cfg: ToyTaskConfig) -> str:
    """Hash of everything that shapes the assets: the config (less where they live and the on switch) and the
    recipe version."""
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("enabled", "dir")}
    if cfg.variant == "short_lists":  # the task as it was before variants: the caches built then stay valid
        del recipe["variant"]
    recipe["recipe_version"] = RECIPE_VERSION
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def build_toy_assets(cfg: ToyTaskConfig, directory: str | Path) -> dict[str, Any]:
    """Build every asset into `directory` (in this process) and write the stamp last; returns the stamp."""
    import time

    from policy.config import PolicyConfig, SFTConfig
    from policy.sft import run_sft
    from reward.train_bradley_terry import train_bradley_terry
    from rlhf_loop.toy.calibration import measure_calibration
    from rlhf_loop.toy.tiny import build_tiny_policy, build_tokenizer

    started = time.monotonic()
    assets = toy_assets(directory)
    variant = VARIANTS[cfg.variant]
    train_prompts, eval_prompts = make_prompts(cfg.seed, cfg.num_train_prompts, cfg.num_eval_prompts, variant.counts)
    sft_examples = make_sft_examples(cfg.seed, train_prompts, cfg.num_sft_examples, cfg.sft_noise())
    rm_category_pairs = make_preference_pairs(cfg.seed, train_prompts, cfg.num_rm_category_pairs, "rm-category",
                                              edited_fraction=0.0, category_fraction=1.0)
    rm_pairs = make_preference_pairs(cfg.seed, train_prompts, cfg.num_rm_pairs, "rm", cfg.rm_edited_fraction,
                                     cfg.rm_category_fraction, variant.partial_rm_answers)
    rm_eval_pairs = make_preference_pairs(cfg.seed, eval_prompts, cfg.num_rm_eval_pairs, "rm-eval",
                                          cfg.rm_edited_fraction, cfg.rm_category_fraction, variant.partial_rm_answers)
    atomic_write_jsonl(assets.train_prompts, train_prompts)
    atomic_write_jsonl(assets.eval_prompts, eval_prompts)
    atomic_write_jsonl(assets.sft_data, sft_examples)
    atomic_write_jsonl(assets.rm_category_pairs, (asdict(pair) for pair in rm_category_pairs))
    atomic_write_jsonl(assets.rm_pairs, (asdict(pair) for pair in rm_pairs))
    atomic_write_jsonl(assets.rm_eval_pairs, (asdict(pair) for pair in rm_eval_pairs))

    tokenizer = build_tokenizer(tokenizer_corpus(train_prompts, sft_examples), cfg.vocab_size)
    build_tiny_policy(tokenizer, assets.base_policy, seed=cfg.seed, hidden_size=cfg.hidden_size,
                      num_layers=cfg.num_layers, num_heads=cfg.hidden_size // 32)
    sft = SFTConfig(learning_rate=cfg.sft_learning_rate, epochs=cfg.sft_epochs, micro_batch_size=cfg.sft_batch_size,
                    max_length=_MAX_LENGTH, max_prompt_length=_MAX_PROMPT_LENGTH, warmup_ratio=0.05)
    sft_stats = run_sft(PolicyConfig(model_path=str(assets.base_policy)), sft,
                        [example["messages"] for example in sft_examples], str(assets.sft_policy), seed=cfg.seed)

    # The reward model starts from the SFT policy, which already tells the categories apart.
    rm_training = dict(lr=cfg.rm_learning_rate, batch_size=cfg.rm_batch_size, max_length=_MAX_LENGTH, seed=cfg.seed)
    category_stage = Path(directory) / "reward_model_category_stage"
    category_metrics = train_bradley_terry(assets.sft_policy, rm_category_pairs, category_stage,
                                           epochs=cfg.rm_category_epochs, **rm_training)
    rm_metrics = train_bradley_terry(category_stage, rm_pairs, assets.reward_model, epochs=cfg.rm_epochs,
                                     eval_pairs=rm_eval_pairs, **rm_training)
    shutil.rmtree(category_stage)
    calibration = measure_calibration(assets, variant=cfg.variant)
    stamp = {
        "recipe_key": recipe_key(cfg),
        "config": asdict(cfg),
        "sft_mean_loss": sft_stats.loss,
        "reward_model_category_stage": asdict(category_metrics),
        "reward_model": asdict(rm_metrics),
        "calibration": asdict(calibration),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    assets.stamp.write_text(json.dumps(stamp, indent=2) + "\n")
    return stamp


def _built_key(stamp: Path) -> str | None:
    try:
        return json.loads(stamp.read_text())["recipe_key"]
    except (OSError, ValueError, KeyError):
        return None


_CHILD_BUILD = (
    "import json, sys; from rlhf_loop.toy.assets import ToyTaskConfig, build_toy_assets; "
    "build_toy_assets(ToyTaskConfig(**json.loads(sys.argv[2])), sys.argv[1])"
)


def _build_in_child_process(cfg: ToyTaskConfig, staging: Path) -> None:
    command = [sys.executable, "-c", _CHILD_BUILD, str(staging), json.dumps(asdict(cfg))]
    # One thread: the models are too small to gain from two, and on a busy 2-core machine two threads per process
    # thrash (an SFT step took 20x longer with two).
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if subprocess.run(command, env=environment).returncode != 0:
        raise RuntimeError(f"building the toy task assets for {cfg.dir} failed; see the error above")
