"""How big each role is, worked out offline: model sizes from config.json (or the name) and the memory each kind
of actor needs (`RolePlan`), with the formulas printed beside the numbers. `rlhf_loop.frontend.plan` adds the checks and
the text of `rlhf-loop plan`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from rlhf_loop.config import RunConfig
from rlhf_loop.driver.data import LOCAL_FORMATS
from rlhf_loop.common.hf_models import dtype_name

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM_MOMENT_BYTES = 8  # two fp32 moments per parameter
MASTER_WEIGHT_BYTES = 4  # the fp32 copy mixed-precision training keeps per parameter
SIZE_IN_NAME = re.compile(r"^(\d+(?:\.\d+)?)([bBmM])$")  # "8B", "1.5b", "135M" as a dash-separated name part
REWARD_HEADS = {"bradley_terry": "sequence_classification", "armorm": "backbone", "pairwise": "causal_lm"}



@dataclass(frozen=True)
class ModelSize:
    """How big a model is, as far as can be known offline."""

    path: str
    parameters: int | None  # None: unknown offline
    source: str  # how `parameters` was found (config.json, a guess from the name) or why it is unknown
    kv_bytes_per_token_per_dtype_byte: int | None = None  # 2 x layers x kv_heads x head_dim (from config.json only)


@dataclass(frozen=True)
class MemoryEstimate:
    bytes_per_actor: int | None  # None when a model size is unknown
    formula: str  # the formula, with its numbers
    shortfall: str | None = None  # why the actor would not fit, when the numbers say so


@dataclass(frozen=True)
class RolePlan:
    """One kind of Ray actor: how many, what each reserves, and the memory each needs."""

    role: str  # rollout | reward | learner | sft
    actors: int
    gpus_per_actor: float
    what: str
    memory: MemoryEstimate


# ---- model sizes --------------------------------------------------------------------------------------------------

def model_size(path: str, trust_remote_code: bool, head: str) -> ModelSize:
    """Parameters counted from config.json (the model built on the meta device: no memory, no weights), else
    guessed from a size in the name ("Meta-Llama-3-8B-Instruct" -> 8B), else unknown."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        return ModelSize(path, count_parameters(config, head), "counted from config.json", kv_bytes_per_token(config))
    except Exception:  # not local, not cached, or an architecture this transformers cannot build
        pass
    guess = size_from_name(path)
    if guess is not None:
        return ModelSize(path, guess, "a guess from the size in its name (config.json is not available offline)")
    if looks_local(path):
        return ModelSize(path, None, "unknown: no config.json there (yet)")
    return ModelSize(path, None, "unknown offline: config.json is neither local nor in the Hugging Face cache "
                                 f"(`huggingface-cli download {path} config.json` fetches just that)")


def count_parameters(config, head: str) -> int:
    """Llama-shaped decoders are counted from their config (importing their modelling code would cost the driver
    seconds at every start); other architectures are built on the meta device and counted."""
    if config.model_type in LLAMA_SHAPED:
        return llama_parameters(config, head)
    return built_parameters(config, head)


LLAMA_SHAPED = ("llama", "mistral")


def llama_parameters(config, head: str) -> int:
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q and o, k and v
    if getattr(config, "attention_bias", False):
        attention += heads * head_dim + 2 * kv_heads * head_dim + hidden
    mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    if getattr(config, "mlp_bias", False):
        mlp += 2 * config.intermediate_size + hidden
    backbone = vocab * hidden + layers * (attention + mlp + 2 * hidden) + hidden  # embeddings, layers, final norm
    heads_on_top = {"backbone": 0, "sequence_classification": hidden,  # one score, no bias
                    "causal_lm": 0 if config.tie_word_embeddings else vocab * hidden}
    return backbone + heads_on_top[head]


def built_parameters(config, head: str) -> int:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    builders = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification,
                "backbone": AutoModel}
    if head == "sequence_classification":
        config.num_labels = 1
    with torch.device("meta"):
        model = builders[head].from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def kv_bytes_per_token(config) -> int | None:
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    layers = getattr(text, "num_hidden_layers", None)
    if not heads or not layers:
        return None
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * layers * kv_heads * head_dim  # keys and values, per byte of the cache dtype


def size_from_name(path: str) -> int | None:
    for part in reversed(re.split(r"[-_]", Path(path).name)):
        if match := SIZE_IN_NAME.match(part):
            return int(float(match.group(1)) * (1e9 if match.group(2) in "bB" else 1e6))
    return None


def reward_models(reward) -> list[tuple[ModelSize, str]]:
    """(size, dtype) of every network the reward actor loads; function and remote kinds load none."""
    if reward.kind == "combined":
        return [model for component in reward.components for model in reward_models(component.reward)]
    if reward.kind not in REWARD_HEADS:
        return []
    return [(model_size(reward.model_path, reward.trust_remote_code, REWARD_HEADS[reward.kind]), reward.dtype)]


def dtype_bytes(dtype: str, device: str) -> int:
    return DTYPE_BYTES[dtype_name(dtype, device)]


# ---- roles --------------------------------------------------------------------------------------------------------

def rollout_role(cfg: RunConfig, device: str, policy: ModelSize, gpu_bytes: int) -> RolePlan:
    rollout = cfg.rollout
    width = dtype_bytes(cfg.policy.dtype, device)
    context = cfg.max_model_len
    engine = "vLLM" if rollout.engine == "vllm" else "HF generate"
    what = (f"{engine} engines: {rollout.samples_per_prompt} samples a prompt, T={rollout.temperature}, "
            f"top_p={rollout.top_p}, up to {rollout.max_tokens} new tokens, context {context}")
    if policy.parameters is None:
        return RolePlan("rollout", rollout.num_engines, gpus(rollout.gpus_per_engine, device), what,
                        MemoryEstimate(None, "policy size unknown"))
    parallel = max(1, int(rollout.gpus_per_engine)) if device == "cuda" else 1
    weights = policy.parameters * width // parallel
    formula = f"weights {human_bytes(weights)} = {params(policy.parameters)} params x {width} B"
    if parallel > 1:
        formula += f" / {parallel} GPUs (tensor parallel)"
    if rollout.engine == "hf":
        formula += "; HF generate allocates its KV cache as it goes (not counted)"
        return RolePlan("rollout", rollout.num_engines, gpus(rollout.gpus_per_engine, device), what,
                        MemoryEstimate(weights, formula))
    if device == "cuda":
        budget = int(rollout.gpu_memory_utilization * gpu_bytes)
        cache = budget - weights
        formula += (f"; vLLM takes gpu_memory_utilization {rollout.gpu_memory_utilization} x "
                    f"{human_bytes(gpu_bytes)} = {human_bytes(budget)} a GPU and gives the rest to the KV cache: "
                    f"{human_bytes(cache)}")
        total = budget
    else:
        cache = rollout.cpu_kv_cache_gib * GIB
        formula += f" + KV cache rollout.cpu_kv_cache_gib {human_bytes(cache)}"
        total = weights + cache
    capacity, shortfall = kv_capacity(policy, width, cache, context, parallel)
    return RolePlan("rollout", rollout.num_engines, gpus(rollout.gpus_per_engine, device), what,
                    MemoryEstimate(total, formula + capacity, shortfall))


def kv_capacity(policy: ModelSize, width: int, cache_bytes: int, context: int, parallel: int) -> tuple[str, str | None]:
    """How many tokens the KV cache holds; vLLM refuses to start unless one full-context sequence fits."""
    if cache_bytes <= 0:
        return "", f"the weights leave no room for a KV cache in {human_bytes(cache_bytes)}; raise the memory share"
    if policy.kv_bytes_per_token_per_dtype_byte is None:
        return "", None
    per_token = policy.kv_bytes_per_token_per_dtype_byte * width // parallel
    tokens = cache_bytes // per_token
    text = f" (KV {per_token / 1024:g} KiB a token: {tokens:,} tokens, {tokens / context:.1f} full contexts at once)"
    if tokens < context:
        return text, f"the KV cache holds {tokens:,} tokens, less than one {context}-token context; raise its share"
    return text, None


def reward_role(cfg: RunConfig, device: str, rewards: list[tuple[ModelSize, str]]) -> RolePlan:
    from reward.registry import uses_accelerator

    reward = cfg.reward
    location = reward.remote.url if reward.kind == "remote" else reward.model_path or reward.function
    what = f"reward {reward.kind}: {location}" if location else f"reward {reward.kind}"
    share = reward.num_gpus if device == "cuda" and uses_accelerator(reward) else 0
    if not rewards:
        return RolePlan("reward", 1, share, what, MemoryEstimate(0, "no network on this side"))
    if any(size.parameters is None for size, _ in rewards):
        return RolePlan("reward", 1, share, what, MemoryEstimate(None, "reward model size unknown"))
    terms = [(size.parameters, dtype_bytes(dtype, device)) for size, dtype in rewards]
    total = sum(count * width for count, width in terms)
    formula = " + ".join(f"{params(count)} params x {width} B" for count, width in terms)
    return RolePlan("reward", 1, share, what, MemoryEstimate(total, f"weights {human_bytes(total)} = {formula}"))


def learner_role(cfg: RunConfig, device: str, policy: ModelSize) -> RolePlan:
    train = cfg.train
    what = (f"DeepSpeed DPO ranks: micro batch {train.micro_batch_size}, accumulation "
            f"{train.gradient_accumulation_steps}, ZeRO-{train.zero_stage}"
            + (", gradient checkpointing" if train.gradient_checkpointing else "")
            + (f", LoRA r={train.lora.r}" if train.lora.enabled else ""))
    width = dtype_bytes(cfg.policy.dtype, device)
    trained = adapter_parameters(cfg) if train.lora.enabled else policy.parameters
    no_reference = reference_not_kept(cfg)
    memory = training_memory(policy, width, train.zero_stage, train.num_workers, with_reference=no_reference is None,
                             trained_parameters=trained)
    if no_reference is not None and policy.parameters is not None:
        saved = human_bytes(policy.parameters * width)
        memory = dataclasses.replace(memory, formula=f"{memory.formula}; no reference kept ({no_reference}): "
                                                     f"saves {saved}")
    return RolePlan("learner", train.num_workers, gpus(train.gpus_per_worker, device), what, memory)


def reference_not_kept(cfg: RunConfig) -> str | None:
    """Why the learner holds no reference model while it trains, or None when it keeps one."""
    from policy.losses import LOSSES

    train = cfg.train
    if not LOSSES[train.loss_type].uses_reference:
        return f"loss_type {train.loss_type} is reference-free"
    if train.lora.enabled and train.reference == "initial":
        return "LoRA: pi_0 is the policy with its adapters off"
    if train.free_reference:
        return "train.free_reference: it scores the iteration's pairs once, then is freed"
    return None


def adapter_parameters(cfg: RunConfig) -> int | None:
    """Parameters of the LoRA adapters train.lora puts on the policy (built on the meta device), None if unknown."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(cfg.policy.model_path, trust_remote_code=cfg.policy.trust_remote_code,
                                            local_files_only=True)
        with torch.device("meta"):
            model = get_peft_model(AutoModelForCausalLM.from_config(config), cfg.train.lora.peft_config())
    except Exception:  # not local, or target modules this model does not have (the learner reports that one)
        return None
    return sum(parameter.numel() for name, parameter in model.named_parameters() if ".lora_" in name)


def sft_role(cfg: RunConfig, device: str, policy: ModelSize) -> RolePlan:
    memory = training_memory(policy, dtype_bytes(cfg.policy.dtype, device), 0, 1, with_reference=False,
                             trained_parameters=policy.parameters)
    return RolePlan("sft", 1, gpus(1, device), "SFT warm start before iteration 1, then released", memory)


def training_memory(policy: ModelSize, width: int, zero_stage: int, workers: int,
                    with_reference: bool, trained_parameters: int | None = None) -> MemoryEstimate:
    """Per worker: weights + reference + gradients + Adam (fp32 master when training below fp32, two fp32
    moments); ZeRO-1 splits the optimizer state over the workers, ZeRO-2 the gradients too, ZeRO-3 the weights too.
    Gradients and Adam cover the trained parameters only (all of them, or LoRA's adapters).

    Not DeepSpeed's estimators (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_...` in
    deepspeed.runtime.zero): they take the parameter count this module works out anyway, and they fix what we vary:
    16-bit weights (no float32 training), every parameter trained (no LoRA), no reference model, no ZeRO-1 case
    (ZeRO-3 also wants the largest layer's size). Where they overlap they count 4 B a parameter more, an fp32 gradient
    copy (ZeRO-2, bf16, 2 workers, 1B parameters: 11.0 GB a GPU to our 9.0 GB). And importing deepspeed costs
    `rlhf-loop plan` about 3 s on a 2-core machine, where this module imports in 0.3 s."""
    if policy.parameters is None:
        return MemoryEstimate(None, "policy size unknown")
    if trained_parameters is None:
        return MemoryEstimate(None, "adapter size unknown")
    count = policy.parameters
    adam = ADAM_MOMENT_BYTES + (MASTER_WEIGHT_BYTES if width < 4 else 0)
    parts = [
        ("weights", count * width, zero_stage >= 3),
        *([("reference", count * width, False)] if with_reference else []),
        ("gradients", trained_parameters * width, zero_stage >= 2),
        ("Adam", trained_parameters * adam, zero_stage >= 1),
    ]
    total = sum(part // (workers if split else 1) for _, part, split in parts)
    formula = " + ".join(f"{name} {human_bytes(part)}" + (f"/{workers}" if split and workers > 1 else "")
                         for name, part, split in parts)
    trained = "" if trained_parameters == count else f", {params(trained_parameters)} trained"
    return MemoryEstimate(total, f"{human_bytes(total)} = {formula} ({params(count)} params{trained}; "
                                 f"Adam {adam} B a param)")


def gpus(share: float, device: str) -> float:
    return share if device == "cuda" else 0


def looks_local(value: str) -> bool:
    """A filesystem path rather than a hub id (owner/name): absolute, relative with ./ or ../, deeper than
    owner/name, or a data/code file."""
    return (value.startswith(("/", "./", "../", "~")) or value.count("/") >= 2
            or Path(value).suffix in (*LOCAL_FORMATS, ".py"))


# ---- numbers as text -------------------------------------------------------------------------------------------------------

def human_bytes(bytes_: float) -> str:
    return f"{bytes_ / GIB:.1f} GiB" if abs(bytes_) >= GIB else f"{bytes_ / 1024**2:.1f} MiB"


def params(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"
