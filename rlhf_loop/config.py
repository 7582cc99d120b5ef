"""The run configuration: typed dataclasses hold every default; YAML files and `key=value` overrides merge over them.

    cfg = load_config("configs/tiny.yaml", ["rollout.samples_per_prompt=4"])

A YAML file may build on another with a top-level `base: other.yaml` (path relative to the file); its own keys win.

Unknown keys, wrong types and values out of range raise `ConfigError` naming the key and the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from policy.config import PolicyConfig, RolloutConfig, SFTConfig, TrainConfig
from reward.config import RewardConfig, reward_config_problems
from rlhf_loop.common.config_files import structured_config, yaml_layers
from rlhf_loop.common.errors import ConfigError
from rlhf_loop.common.hf_models import DTYPE_NAMES
from rlhf_loop.toy.assets import ToyTaskConfig
from rlhf_loop.toy.smollm2 import SmolLM2Config


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


# The names pair selection (rlhf_loop/driver/pairs.py) implements, here so the config checks them without importing
# the driver: max_min (best vs worst), max_random, random; and the ways of picking several pairs per prompt.
PAIR_STRATEGIES = ("max_min", "max_random", "random")
PAIR_MULTI = ("best_vs_worst", "top_vs_bottom")


@dataclass
class PairsConfig:
    strategy: str = "max_min"  # one of PAIR_STRATEGIES; see rlhf_loop/driver/pairs.py
    min_margin: float = 0.0  # keep a pair only if chosen beats rejected by more than this (so ties are dropped)
    per_prompt: int = 1  # pairs per prompt; above 1 they are picked by pairs.multi (strategy stays max_min)
    # with per_prompt N > 1: best_vs_worst (the best response against each of the N worst) | top_vs_bottom (the i-th
    # best against the i-th worst, i = 1..N; needs 2N <= K)
    multi: str = "best_vs_worst"
    # Offline DPO: train on this preference dataset (hub name or local file with chosen/rejected conversations)
    # instead of generating and scoring; then no rollout engine or reward model is started.
    dataset: str | None = None
    dataset_split: str = "train"  # split of pairs.dataset
    export_format: str = "none"  # also write each iteration's pairs as a DPO dataset: none | disk | parquet
    export_test_fraction: float = 0.02  # share of exported pairs held out as the "test" split
    push_to_hub: str | None = None  # a hub repo id to push the exported pairs dataset to
    push_to_hub_private: bool = True  # create that repo private; set false to publish the pairs


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
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str | None = None  # wandb project; None: $WANDB_PROJECT, else rlhf-loop
    entity: str | None = None  # wandb team or user; None: $WANDB_ENTITY, else your default
    name: str | None = None  # default: the run directory's name
    tags: list[str] = field(default_factory=list)  # wandb tags

    @property
    def resolved_project(self) -> str:
        return self.project or os.environ.get("WANDB_PROJECT") or "rlhf-loop"

    @property
    def resolved_entity(self) -> str | None:
        return self.entity or os.environ.get("WANDB_ENTITY")


PLACEMENT_STRATEGIES = ("pack", "spread", "strict_pack", "strict_spread")  # Ray's, in lower case


@dataclass
class RolePlacement:
    """Where one role's actors go on the Ray cluster (each actor gets one bundle of a placement group)."""

    # a custom resource that marks the nodes this role may use (a node started with
    # `ray start --resources='{"gpu_node_a": 1}'` has gpu_node_a); None: any node
    resource: str | None = None
    strategy: str = "pack"  # how the role's actors spread over those nodes: pack | spread | strict_pack | strict_spread


@dataclass
class PlacementConfig:
    rollout: RolePlacement = field(default_factory=RolePlacement)  # the rollout engines
    learner: RolePlacement = field(default_factory=RolePlacement)  # the DPO learner's ranks
    reward: RolePlacement = field(default_factory=RolePlacement)  # the reward actor
    # every role's actors are reserved before any starts; a layout not placed within this stops the run naming the role
    timeout_s: float = 60.0


@dataclass
class ClusterConfig:
    address: str | None = None  # an existing Ray cluster ("auto" or host:port; else $RAY_ADDRESS); None: a local one
    node_ip_address: str | None = None  # this machine's address in the cluster; None: loopback if the head is, else Ray's
    num_cpus: int | None = None  # CPUs for a local Ray instance; None: all of them
    max_actor_restarts: int = 3  # a dead rollout or reward actor is restarted this often, its work redone
    placement: PlacementConfig = field(default_factory=PlacementConfig)  # which nodes each role uses
    # CUDA only: each learner rank shares its GPU with one rollout engine (and GPU 0 with the reward model, when it
    # runs a network); the engines sleep (weights to host memory, KV cache dropped) while the learner trains
    colocate: bool = False


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
    smollm2: SmolLM2Config = field(default_factory=SmolLM2Config)  # converts SmolLM2-135M-Instruct (demo-real)

    @property
    def online(self) -> bool:
        """Online DPO samples and scores its pairs; offline DPO (pairs.dataset set) trains on a given preference
        dataset and starts no rollout engine and no reward model."""
        return self.pairs.dataset is None

    @property
    def max_model_len(self) -> int:
        """The engines' context: rollout.max_model_len, or the longest prompt plus the longest response any stage
        asks for."""
        return self.rollout.max_model_len or self.data.max_prompt_tokens + max(self.rollout.max_tokens,
                                                                               self.eval.max_tokens)

    @property
    def evaluates(self) -> bool:
        """Evaluation needs held-out prompts (eval.prompts), sampled responses and a learner for the KL estimate."""
        return self.online and self.train.enabled and self.eval.prompts is not None

    def policy_version(self, iteration: int) -> int:
        """The iteration whose trained weights sample `iteration`'s responses (0: pi_0): the one before it, or under
        rollout.max_staleness 1 the one before that. Without train.enabled nothing moves: pi_0 throughout."""
        return max(iteration - 1 - self.rollout.max_staleness, 0) if self.train.enabled else 0


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Merge a YAML file and `key=value` overrides over the defaults, then validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/tiny.yaml")
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not key=value; write e.g. rollout.samples_per_prompt=4")
    return structured_config(RunConfig, yaml_layers(path), overrides, path, validate)


def validate(cfg: RunConfig) -> list[str]:
    """Value checks the type system cannot express; each problem names the key and a fix."""
    from policy.losses import LOSSES

    checks = [
        (cfg.iterations >= 1, f"iterations must be >= 1, got {cfg.iterations}"),
        (cfg.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {cfg.device!r}"),
        (cfg.policy.dtype in DTYPE_NAMES, f"policy.dtype must be one of {', '.join(DTYPE_NAMES)}, got {cfg.policy.dtype!r}"),
        (len(cfg.data.prompts) >= 1 or not cfg.online,
         "data.prompts is empty; give at least one dataset name or file (or pairs.dataset for offline DPO)"),
        (cfg.online or cfg.iterations == 1,
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
        (cfg.rollout.weight_sync in ("collective", "object_store"),
         f"rollout.weight_sync must be collective or object_store, got {cfg.rollout.weight_sync!r}"),
        (cfg.rollout.weight_sync_bucket_mb >= 1,
         f"rollout.weight_sync_bucket_mb must be >= 1, got {cfg.rollout.weight_sync_bucket_mb}"),
        (cfg.rollout.weight_sync_timeout_s > 0,
         f"rollout.weight_sync_timeout_s must be > 0, got {cfg.rollout.weight_sync_timeout_s}"),
        (cfg.rollout.shard_size >= 1, f"rollout.shard_size must be >= 1, got {cfg.rollout.shard_size}"),
        (cfg.rollout.max_staleness in (0, 1),
         f"rollout.max_staleness must be 0 (on-policy) or 1 (sample one update behind), got {cfg.rollout.max_staleness}"),
        (cfg.rollout.max_tokens >= 1, f"rollout.max_tokens must be >= 1, got {cfg.rollout.max_tokens}"),
        (cfg.rollout.temperature >= 0, f"rollout.temperature must be >= 0, got {cfg.rollout.temperature}"),
        (0 < cfg.rollout.top_p <= 1, f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}"),
        (cfg.pairs.strategy in PAIR_STRATEGIES,
         f"pairs.strategy {cfg.pairs.strategy!r} is unknown; use one of {sorted(PAIR_STRATEGIES)}"),
        (cfg.pairs.min_margin >= 0, f"pairs.min_margin must be >= 0, got {cfg.pairs.min_margin}"),
        (cfg.pairs.per_prompt >= 1, f"pairs.per_prompt must be >= 1, got {cfg.pairs.per_prompt}"),
        (cfg.pairs.multi in PAIR_MULTI, f"pairs.multi {cfg.pairs.multi!r} is unknown; use one of {list(PAIR_MULTI)}"),
        (cfg.pairs.per_prompt == 1 or cfg.pairs.strategy == "max_min",
         f"pairs.per_prompt > 1 picks pairs by pairs.multi; leave pairs.strategy at max_min "
         f"(got {cfg.pairs.strategy})"),
        (cfg.pairs.per_prompt <= max_pairs_per_prompt(cfg),
         f"pairs.per_prompt {cfg.pairs.per_prompt} is more than {cfg.pairs.multi} can pick from "
         f"rollout.samples_per_prompt {cfg.rollout.samples_per_prompt}; use at most {max_pairs_per_prompt(cfg)}"),
        (cfg.pairs.export_format in ("none", "disk", "parquet"),
         f"pairs.export_format must be none, disk or parquet, got {cfg.pairs.export_format!r}"),
        (0 <= cfg.pairs.export_test_fraction < 1,
         f"pairs.export_test_fraction must be in [0, 1), got {cfg.pairs.export_test_fraction}"),
        (cfg.train.enabled or cfg.online,
         "pairs.dataset (offline DPO) needs train.enabled: true; there is nothing else to do with its pairs"),
        (cfg.train.loss_type in LOSSES, f"train.loss_type {cfg.train.loss_type!r} is unknown; use one of {sorted(LOSSES)}"),
        (cfg.train.reference in ("initial", "previous"),
         f"train.reference must be initial or previous, got {cfg.train.reference!r}"),
        (cfg.train.beta > 0, f"train.beta must be > 0, got {cfg.train.beta}"),
        (0 <= cfg.train.label_smoothing < 0.5, f"train.label_smoothing must be in [0, 0.5), got {cfg.train.label_smoothing}"),
        (cfg.train.label_smoothing == 0 or cfg.train.loss_type not in LOSSES
         or LOSSES[cfg.train.loss_type].label_smoothing,
         f"train.label_smoothing has no meaning for loss_type {cfg.train.loss_type}; set it to 0 or use a logistic "
         "loss (sigmoid, sigmoid_norm, simpo, rpo)"),
        (cfg.train.simpo_gamma >= 0, f"train.simpo_gamma must be >= 0, got {cfg.train.simpo_gamma}"),
        (cfg.train.rpo_alpha >= 0, f"train.rpo_alpha must be >= 0, got {cfg.train.rpo_alpha}"),
        (cfg.train.margin_weighting in ("none", "linear"),
         f"train.margin_weighting must be none or linear, got {cfg.train.margin_weighting!r}"),
        (cfg.train.lora.r >= 1, f"train.lora.r must be >= 1, got {cfg.train.lora.r}"),
        (cfg.train.lora.alpha > 0, f"train.lora.alpha must be > 0, got {cfg.train.lora.alpha}"),
        (0 <= cfg.train.lora.dropout < 1, f"train.lora.dropout must be in [0, 1), got {cfg.train.lora.dropout}"),
        (len(cfg.train.lora.target_modules) >= 1,
         "train.lora.target_modules is empty; name the modules to adapt (e.g. [q_proj, v_proj]) or use [all-linear]"),
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
        (cfg.rollout.call_timeout_s > 0, f"rollout.call_timeout_s must be > 0, got {cfg.rollout.call_timeout_s}"),
        (cfg.train.call_timeout_s > 0, f"train.call_timeout_s must be > 0, got {cfg.train.call_timeout_s}"),
        (cfg.sft.call_timeout_s > 0, f"sft.call_timeout_s must be > 0, got {cfg.sft.call_timeout_s}"),
        (cfg.cluster.max_actor_restarts >= 0,
         f"cluster.max_actor_restarts must be >= 0, got {cfg.cluster.max_actor_restarts}"),
        *placement_checks(cfg.cluster.placement),
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
    # Offline DPO starts no reward model, so its reward section is not checked.
    return [message for ok, message in checks if not ok] + (reward_config_problems(cfg.reward) if cfg.online else [])


def placement_checks(placement: PlacementConfig) -> list[tuple[bool, str]]:
    checks = [(placement.timeout_s > 0, f"cluster.placement.timeout_s must be > 0, got {placement.timeout_s}")]
    for role in ("rollout", "learner", "reward"):
        strategy = getattr(placement, role).strategy
        checks.append((strategy in PLACEMENT_STRATEGIES, f"cluster.placement.{role}.strategy must be one of "
                                                         f"{', '.join(PLACEMENT_STRATEGIES)}, got {strategy!r}"))
    return checks


def max_pairs_per_prompt(cfg: RunConfig) -> int:
    """How many pairs pairs.multi can pick among K responses: the best against K - 1 others, or K // 2 disjoint."""
    samples = cfg.rollout.samples_per_prompt
    return samples // 2 if cfg.pairs.multi == "top_vs_bottom" else samples - 1


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
