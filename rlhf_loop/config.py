"""The run configuration: typed dataclasses hold every default; YAML files and `key=value` overrides merge over them.

    cfg = load_config("configs/tiny.yaml", ["rollout.samples_per_prompt=4"])

A YAML file may build on another with a top-level `base: other.yaml` (path relative to the file); its own keys win.

Unknown keys, wrong types and values out of range raise `ConfigError` naming the key and the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from policy.config import PolicyConfig, RolloutConfig, TrainConfig
from reward.config import RewardConfig, reward_config_problems
from rlhf_loop.errors import ConfigError
from rlhf_loop.toy_task import ToyTaskConfig


@dataclass
class DataConfig:
    # One dataset used by every iteration, or one per iteration (RLHFlow draws fresh prompts each round).
    # Each is a HF hub dataset name or a local .json/.jsonl/.parquet file.
    prompts: list[str] = field(default_factory=list)
    split: str = "train"  # dataset split, for hub datasets
    prompt_column: str = "prompt"  # a list of chat messages, or a plain string (made into one user turn)
    prompts_per_iteration: int | None = None  # with one dataset: iteration i takes the i-th slice of this size
    max_prompt_tokens: int = 512  # prompts longer than this (after the chat template) are skipped and counted
    shuffle: bool = True  # shuffle the prompt set once, with the run seed, before slicing


@dataclass
class PairsConfig:
    strategy: str = "max_min"  # max_min (best vs worst) | max_random | random; see rlhf_loop/pairs.py
    min_margin: float = 0.0  # keep a pair only if chosen beats rejected by more than this (so ties are dropped)
    # Offline DPO: train on this preference dataset (hub name or local file with chosen/rejected conversations)
    # instead of generating and scoring; then no rollout engine or reward model is started.
    dataset: str | None = None
    dataset_split: str = "train"  # split of pairs.dataset
    export_format: str = "none"  # also write each iteration's pairs as a DPO dataset: none | disk | parquet
    export_test_fraction: float = 0.02  # share of exported pairs held out as the "test" split
    push_to_hub: str | None = None  # a hub repo id to push the exported pairs dataset to


@dataclass
class EvalConfig:
    prompts: str | None = None  # held-out prompt dataset (hub name or local file); None: no evaluation
    prompt_column: str = "${data.prompt_column}"  # like data.prompt_column
    split: str = "train"  # dataset split, for hub datasets
    num_prompts: int = 64  # at most this many held-out prompts
    samples_per_prompt: int = 1  # responses sampled per prompt: more samples, less noise in every eval/ mean
    temperature: float = 1.0  # samples from the policy: the KL estimate needs on-policy samples
    max_tokens: int = "${rollout.max_tokens}"  # type: ignore[assignment]
    gold_reward: str | None = None  # "module:attr" of a gold scorer (toy tasks): fn(messages, response, meta) -> float


@dataclass
class SFTConfig:
    enabled: bool = False  # run a supervised warm start before the first iteration
    dataset: str | None = None  # hub name or local file with chat conversations to imitate
    messages_column: str = "messages"  # column holding each conversation (its last turn is the target)
    learning_rate: float = 1e-4  # peak learning rate (AdamW)
    epochs: int = 1  # passes over the SFT dataset
    micro_batch_size: int = 8  # conversations per optimizer step
    max_length: int = 512  # prompt + response tokens
    max_prompt_length: int = 256  # prompts are cut from the left to this many tokens; the response fills the rest
    save_steps: int = 50  # optimizer steps between SFT checkpoints: the unit of work a crash can cost
    lr_schedule: str = "cosine"  # constant | linear | cosine, after linear warmup
    warmup_ratio: float = 0.1  # fraction of the SFT optimizer steps spent warming up
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "rlhf-loop"  # wandb project
    entity: str | None = None  # wandb team or user; None: your default
    name: str | None = None  # default: the run directory's name
    tags: list[str] = field(default_factory=list)  # wandb tags


@dataclass
class ClusterConfig:
    address: str | None = None  # an existing Ray cluster ("auto" or host:port); None starts a local one
    num_cpus: int | None = None  # CPUs for a local Ray instance; None: all of them


@dataclass
class RunConfig:
    iterations: int = 3  # rounds of generate -> score -> pair -> train -> sync
    seed: int = 0  # one seed drives prompt order, sampling, pair choice and training order
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    toy_task: ToyTaskConfig = field(default_factory=ToyTaskConfig)  # builds the bundled toy task's assets (demo)


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Merge a YAML file and `key=value` overrides over the defaults, then validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/tiny.yaml")
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not key=value; write e.g. rollout.samples_per_prompt=4")
    return structured_config(RunConfig, yaml_layers(path), overrides, path, validate)


def structured_config(schema: type, layers: Sequence, overrides: Sequence[str], path: Path,
                      problems: Callable[[Any], list[str]], reference: str = "the config reference in README.md"):
    """`layers`, then `key=value` overrides, merged over `schema`'s defaults, built and checked by `problems`.

    Every failure is one ConfigError line naming the file or the override, and the key; `reference` is where the
    valid keys are documented. Shared by the run config and the reward server's config."""
    merged = OmegaConf.structured(schema)
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {describe_config_error(e, reference)}") from None
    for override in overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {override!r}: {describe_config_error(e, reference)}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {describe_config_error(e, reference)}") from None
    found = problems(cfg)
    if found:
        raise ConfigError(f"{path}: {found[0]}")
    return cfg


def yaml_layers(path: Path, seen: tuple[Path, ...] = ()) -> list:
    """The YAML file and, first, the files it builds on: a top-level `base: other.yaml` (relative to the file)."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' files include each other in a cycle")
    try:
        layer = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors
        raise ConfigError(f"{path}: cannot parse YAML: {str(e).splitlines()[0]}") from None
    base = layer.pop("base", None) if isinstance(layer, DictConfig) else None
    if base is None:
        return [layer]
    base_path = path.parent / str(base)
    if not base_path.is_file():
        raise ConfigError(f"{path}: base file {base_path} does not exist")
    return yaml_layers(base_path, seen + (path.resolve(),)) + [layer]


def describe_config_error(error: OmegaConfBaseException, reference: str = "the config reference in README.md") -> str:
    """One line for an OmegaConf error: the full key and what is wrong with it."""
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    if type(error).__name__ == "ConfigKeyError" and key:
        return f"unknown key '{key}'; check its spelling against {reference}"
    if type(error).__name__ == "MissingMandatoryValue" and key:
        return f"'{key}' is required; set it in the file or as {key}=..."
    return f"'{key}': {message}" if key else message


def validate(cfg: RunConfig) -> list[str]:
    """Value checks the type system cannot express; each problem names the key and a fix."""
    from policy.losses import LOSSES
    from rlhf_loop.pairs import STRATEGIES

    checks = [
        (cfg.iterations >= 1, f"iterations must be >= 1, got {cfg.iterations}"),
        (cfg.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {cfg.device!r}"),
        (cfg.policy.dtype in ("auto", "float32", "bfloat16", "float16"),
         f"policy.dtype must be auto, float32, bfloat16 or float16, got {cfg.policy.dtype!r}"),
        (len(cfg.data.prompts) >= 1 or cfg.pairs.dataset is not None,
         "data.prompts is empty; give at least one dataset name or file (or pairs.dataset for offline DPO)"),
        (cfg.pairs.dataset is None or cfg.iterations == 1,
         f"pairs.dataset (offline DPO) runs one iteration; set iterations: 1 (got {cfg.iterations})"),
        (
            len(cfg.data.prompts) in (0, 1, cfg.iterations),
            f"data.prompts has {len(cfg.data.prompts)} entries; give one, or one per iteration ({cfg.iterations})",
        ),
        (
            cfg.rollout.samples_per_prompt >= 2,
            f"rollout.samples_per_prompt must be >= 2 to form a pair, got {cfg.rollout.samples_per_prompt}",
        ),
        (cfg.rollout.engine in ("vllm", "hf"), f"rollout.engine must be vllm or hf, got {cfg.rollout.engine!r}"),
        (cfg.rollout.num_engines >= 1, f"rollout.num_engines must be >= 1, got {cfg.rollout.num_engines}"),
        (cfg.rollout.shard_size >= 1, f"rollout.shard_size must be >= 1, got {cfg.rollout.shard_size}"),
        (cfg.rollout.max_tokens >= 1, f"rollout.max_tokens must be >= 1, got {cfg.rollout.max_tokens}"),
        (cfg.rollout.temperature >= 0, f"rollout.temperature must be >= 0, got {cfg.rollout.temperature}"),
        (0 < cfg.rollout.top_p <= 1, f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}"),
        (cfg.pairs.strategy in STRATEGIES,
         f"pairs.strategy {cfg.pairs.strategy!r} is unknown; use one of {sorted(STRATEGIES)}"),
        (cfg.pairs.min_margin >= 0, f"pairs.min_margin must be >= 0, got {cfg.pairs.min_margin}"),
        (cfg.pairs.export_format in ("none", "disk", "parquet"),
         f"pairs.export_format must be none, disk or parquet, got {cfg.pairs.export_format!r}"),
        (0 <= cfg.pairs.export_test_fraction < 1,
         f"pairs.export_test_fraction must be in [0, 1), got {cfg.pairs.export_test_fraction}"),
        (cfg.train.enabled or cfg.pairs.dataset is None,
         "pairs.dataset (offline DPO) needs train.enabled: true; there is nothing else to do with its pairs"),
        (cfg.train.loss_type in LOSSES, f"train.loss_type {cfg.train.loss_type!r} is unknown; use one of {sorted(LOSSES)}"),
        (cfg.train.reference in ("initial", "previous"),
         f"train.reference must be initial or previous, got {cfg.train.reference!r}"),
        (cfg.train.beta > 0, f"train.beta must be > 0, got {cfg.train.beta}"),
        (0 <= cfg.train.label_smoothing < 0.5, f"train.label_smoothing must be in [0, 0.5), got {cfg.train.label_smoothing}"),
        (cfg.train.lr_schedule in ("constant", "linear", "cosine"),
         f"train.lr_schedule must be constant, linear or cosine, got {cfg.train.lr_schedule!r}"),
        (0 <= cfg.train.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {cfg.train.warmup_ratio}"),
        (cfg.train.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0, 1, 2 or 3, got {cfg.train.zero_stage}"),
        (cfg.train.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {cfg.train.micro_batch_size}"),
        (cfg.train.gradient_accumulation_steps >= 1,
         f"train.gradient_accumulation_steps must be >= 1, got {cfg.train.gradient_accumulation_steps}"),
        (cfg.train.num_workers >= 1, f"train.num_workers must be >= 1, got {cfg.train.num_workers}"),
        (cfg.train.gpus_per_worker > 0, f"train.gpus_per_worker must be > 0, got {cfg.train.gpus_per_worker}"),
        (cfg.rollout.gpus_per_engine > 0, f"rollout.gpus_per_engine must be > 0, got {cfg.rollout.gpus_per_engine}"),
        (cfg.train.save_steps >= 1, f"train.save_steps must be >= 1, got {cfg.train.save_steps}"),
        (cfg.train.max_prompt_length < cfg.train.max_length,
         f"train.max_prompt_length ({cfg.train.max_prompt_length}) must be < train.max_length ({cfg.train.max_length})"),
        (not cfg.sft.enabled or cfg.sft.dataset is not None, "sft.enabled is true but sft.dataset is not set"),
        (cfg.train.epochs >= 1, f"train.epochs must be >= 1, got {cfg.train.epochs}"),
        (cfg.sft.epochs >= 1, f"sft.epochs must be >= 1, got {cfg.sft.epochs}"),
        (cfg.sft.micro_batch_size >= 1, f"sft.micro_batch_size must be >= 1, got {cfg.sft.micro_batch_size}"),
        (cfg.sft.save_steps >= 1, f"sft.save_steps must be >= 1, got {cfg.sft.save_steps}"),
        (cfg.sft.lr_schedule in ("constant", "linear", "cosine"),
         f"sft.lr_schedule must be constant, linear or cosine, got {cfg.sft.lr_schedule!r}"),
        (0 <= cfg.sft.warmup_ratio < 1, f"sft.warmup_ratio must be in [0, 1), got {cfg.sft.warmup_ratio}"),
        (cfg.sft.max_prompt_length < cfg.sft.max_length,
         f"sft.max_prompt_length ({cfg.sft.max_prompt_length}) must be < sft.max_length ({cfg.sft.max_length})"),
        (cfg.eval.num_prompts >= 1, f"eval.num_prompts must be >= 1, got {cfg.eval.num_prompts}"),
        (cfg.eval.samples_per_prompt >= 1, f"eval.samples_per_prompt must be >= 1, got {cfg.eval.samples_per_prompt}"),
        (cfg.wandb.mode in ("disabled", "offline", "online"),
         f"wandb.mode must be disabled, offline or online, got {cfg.wandb.mode!r}"),
    ]
    online = cfg.pairs.dataset is None  # offline DPO starts no reward model
    return [message for ok, message in checks if not ok] + (reward_config_problems(cfg.reward) if online else [])


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
