"""The DPO learner: one data-parallel rank of a DeepSpeed engine that keeps the policy in memory across iterations.

    learner = DPOLearner(cfg.policy, cfg.train, device="cpu", seed=0)
    total = learner.begin_iteration(1, pairs, reference_dir=None)
    while step < total: stats = learner.train_steps(cfg.train.save_steps); learner.save_checkpoint(...)
    engines.update_weights(learner.named_weights())

`PolicyEngine` holds what the DPO and SFT learners share (model loading, the DeepSpeed engine, the optimizer step,
the learning-rate schedule, atomic checkpoints, weight gathering, HF export, greedy generation); `DPOLearner` adds
the reference model, the pairs of an iteration and the DPO losses. `policy.learner_group.LearnerGroup` runs one
learner per rank in Ray actors; tests use a learner in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import shutil
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from policy.config import PolicyConfig, TrainConfig
from policy.losses import LOSSES
from rlhf_loop.records import Pair

Item = TypeVar("Item")
WeightedMicroBatch = list[tuple[Any, float]]

_ENGINE_TAG = "engine"  # DeepSpeed's sub-directory inside a checkpoint directory


# ---------------------------------------------------------------------------------------------------------------------
# Optimisation settings and the learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizationSpec:
    """What the shared engine needs to know about optimisation, whichever config section it comes from."""

    learning_rate: float
    lr_schedule: str  # constant | linear | cosine, after linear warmup
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    micro_batch_size: int
    gradient_accumulation_steps: int
    zero_stage: int
    gradient_checkpointing: bool

    @classmethod
    def from_train(cls, train: TrainConfig) -> OptimizationSpec:
        return cls(
            learning_rate=train.learning_rate,
            lr_schedule=train.lr_schedule,
            warmup_ratio=train.warmup_ratio,
            weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm,
            micro_batch_size=train.micro_batch_size,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            zero_stage=train.zero_stage,
            gradient_checkpointing=train.gradient_checkpointing,
        )


def learning_rate_at(step: int, total_steps: int, spec: OptimizationSpec) -> float:
    """The learning rate of optimizer step `step` (0-based) of a run of `total_steps` steps.

    A pure function of the step, so resuming needs no scheduler state. Warmup ramps up to the peak over the first
    ceil(warmup_ratio * total_steps) steps (the first step already moves); the decay reaches 0 after the last step.
    """
    warmup_steps = math.ceil(spec.warmup_ratio * total_steps)
    if step < warmup_steps:
        return spec.learning_rate * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if spec.lr_schedule == "constant":
        return spec.learning_rate
    if spec.lr_schedule == "linear":
        return spec.learning_rate * (1.0 - progress)
    if spec.lr_schedule == "cosine":
        return spec.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule {spec.lr_schedule!r} is unknown; use constant, linear or cosine")


# ---------------------------------------------------------------------------------------------------------------------
# Data: truncation, padding, deterministic batch order, the per-rank share of a global batch
# ---------------------------------------------------------------------------------------------------------------------


def truncate(prompt: Sequence[int], response: Sequence[int], max_prompt_length: int, max_length: int):
    """Keep the end of the prompt (the turn being answered) and the start of the response."""
    prompt = list(prompt[-max_prompt_length:])
    return prompt, list(response[: max_length - len(prompt)])


@dataclass(frozen=True)
class PaddedBatch:
    input_ids: torch.Tensor  # [batch, length], right-padded
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # 1 on response tokens: the ones whose log-probability counts


def pad_batch(sequences: Sequence[tuple[list[int], list[int]]], pad_token_id: int, device: torch.device) -> PaddedBatch:
    """(prompt, response) token lists as one right-padded batch."""
    length = max(len(prompt) + len(response) for prompt, response in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        tokens = prompt + response
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
        response_mask[row, len(prompt) : len(tokens)] = 1
    return PaddedBatch(input_ids.to(device), attention_mask.to(device), response_mask.to(device))


def response_log_probs(model: Callable[..., Any], batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its response tokens, and how many there are."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    targets = batch.input_ids[:, 1:]
    # One row at a time in float32: a full-vocabulary log_softmax of the whole batch is the memory peak otherwise.
    token_log_probs = torch.stack(
        [
            row.float().gather(-1, row_targets.unsqueeze(-1)).squeeze(-1) - row.float().logsumexp(-1)
            for row, row_targets in zip(logits[:, :-1], targets)
        ]
    )
    mask = batch.response_mask[:, 1:]
    return (token_log_probs * mask).sum(-1), mask.sum(-1)


def batch_schedule(num_items: int, epochs: int, global_batch_size: int, seed_key: Sequence[int]) -> list[list[int]]:
    """Item indices of every optimizer step: one permutation per epoch, drawn from (seed_key, epoch), cut into
    global batches (the last one of an epoch may be smaller)."""
    steps = []
    for epoch in range(epochs):
        order = np.random.default_rng([*seed_key, epoch]).permutation(num_items).tolist()
        steps += [order[start : start + global_batch_size] for start in range(0, num_items, global_batch_size)]
    return steps


def rank_micro_batches(
    global_batch: Sequence[Item], rank: int, world_size: int, micro_batch_size: int
) -> list[list[tuple[Item, float]]]:
    """This rank's share of a global batch as micro batches of (item, weight).

    Every rank must run the same number of forward/backward passes (ZeRO's collectives run inside them), so a rank
    whose share is short of the others' is padded with weight-0 copies of the batch's first item.
    """
    share = ceil_div(len(global_batch), world_size)
    mine = [(item, 1.0) for item in global_batch[rank::world_size]]
    mine += [(global_batch[0], 0.0)] * (share - len(mine))
    return [mine[start : start + micro_batch_size] for start in range(0, share, micro_batch_size)]


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def fingerprint(records: Sequence[Sequence[Sequence[int]]]) -> str:
    """A short hash of training data (token-id lists per record), so a resumed run can check it got the same data."""
    digest = hashlib.sha256()
    for record in records:
        for tokens in record:
            digest.update(len(tokens).to_bytes(8, "little"))
            digest.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# Process set-up and model loading
# ---------------------------------------------------------------------------------------------------------------------


def init_distributed(device: str, rank: int, world_size: int) -> None:
    """Join (or create) the process group DeepSpeed needs: gloo on CPU, nccl on CUDA.

    A launcher (torchrun, LearnerGroup) sets MASTER_ADDR/MASTER_PORT; a lone in-process learner picks a free port.
    """
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed is first imported
    if world_size > 1 and "MASTER_PORT" not in os.environ:
        raise ValueError(
            f"{world_size} learner ranks need MASTER_ADDR and MASTER_PORT set; start them with LearnerGroup or torchrun"
        )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    if (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) != (rank, world_size):
        raise ValueError(
            f"learner rank {rank}/{world_size} disagrees with RANK={os.environ['RANK']} "
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} in the environment; unset them or pass the same values"
        )
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def torch_device(device: str) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    raise ValueError(f"device must be cpu or cuda, got {device!r}")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    known = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in known:
        raise ValueError(f"policy.dtype {dtype!r} is unknown; use auto, float32, bfloat16 or float16")
    return known[dtype]


def load_tokenizer(policy: PolicyConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        policy.tokenizer_path or policy.model_path, trust_remote_code=policy.trust_remote_code
    )


def load_causal_lm(path: str, policy: PolicyConfig, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=policy.trust_remote_code)
    disable_dropout(model)
    return model.to(device)


def load_reference(path: str, policy: PolicyConfig, dtype: torch.dtype, device: torch.device):
    """A frozen copy of a policy: the anchor of the DPO log-ratios."""
    model = load_causal_lm(path, policy, dtype, device)
    model.eval()
    model.requires_grad_(False)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares log-probs of the policy and the reference: dropout noise would bias both.

    Modules read dropout either from nn.Dropout layers or from float attributes copied from the config at init
    (e.g. Llama's `attention_dropout`), so both are zeroed; the config itself is left as it was for export.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------------------------------------------------------------
# The shared engine
# ---------------------------------------------------------------------------------------------------------------------


class PolicyEngine:
    """pi_theta inside a DeepSpeed engine, and what every trainer of it needs."""

    def __init__(
        self, policy: PolicyConfig, spec: OptimizationSpec, device: str, seed: int, rank: int, world_size: int
    ):
        init_distributed(device, rank, world_size)
        import deepspeed

        torch.manual_seed(seed)
        self.policy_config = policy
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.device = torch_device(device)
        self.dtype = resolve_dtype(policy.dtype, device)
        self.tokenizer = load_tokenizer(policy)
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        model = load_causal_lm(policy.model_path, policy, self.dtype, self.device)
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # A plain torch AdamW: DeepSpeed's own Adam kernels would need a JIT build per machine.
        self.optimizer = torch.optim.AdamW(parameter_groups(model, spec.weight_decay), lr=spec.learning_rate)
        hidden_size = model.config.get_text_config().hidden_size
        config = deepspeed_config(spec, world_size, self.dtype, hidden_size)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def zero3(self) -> bool:
        return self.spec.zero_stage == 3

    # --- training -------------------------------------------------------------------------------------------------

    def optimizer_step(
        self, micro_batches: Sequence[WeightedMicroBatch], loss_of: Callable[[WeightedMicroBatch], torch.Tensor],
        learning_rate: float,
    ) -> None:
        """One optimizer step over this rank's micro batches. `loss_of` returns a micro batch's share of the global
        mean loss, already scaled by the world size (DeepSpeed averages gradients over ranks)."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.engine.train()
        for index, micro_batch in enumerate(micro_batches):
            # We own accumulation: the last global batch of an epoch can have fewer micro batches than configured.
            self.engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
            self.engine.backward(loss_of(micro_batch), scale_wrt_gas=False)
        self.engine.step()

    def reset_optimizer(self) -> None:
        """Adam moments and step counts back to zero: the next step behaves like the first of a fresh AdamW.

        Zeroed in place rather than dropped, so ZeRO's flat partitions and checkpoint layout stay as they are.
        """
        for state in self.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        values = values.to(self.device)
        dist.all_reduce(values)
        return values.cpu()

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        """Weights, optimizer state, `client_state` and every rank's RNG states, written atomically."""
        with atomic_directory(directory, self.rank) as partial:
            self.engine.save_checkpoint(str(partial), tag=_ENGINE_TAG, client_state=client_state, save_latest=False)
            torch.save(rng_states(), partial / f"rng_rank{self.rank}.pt")

    def load(self, directory: str) -> dict[str, Any]:
        """Restore what `save` wrote; returns the client state."""
        if not (Path(directory) / _ENGINE_TAG).is_dir():
            raise ValueError(f"{directory} is not a learner checkpoint (no {_ENGINE_TAG}/ inside)")
        _, client_state = self.engine.load_checkpoint(
            directory, tag=_ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        set_rng_states(torch.load(Path(directory) / f"rng_rank{self.rank}.pt", weights_only=False))
        return client_state

    # --- weights out ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        """Under ZeRO-3 every rank holds a slice of each parameter: gather them (a collective, all ranks enter)."""
        if not self.zero3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            yield

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Full weights on CPU for rank 0; other ranks only take part in the ZeRO-3 gather and get []."""
        with self.full_parameters():
            if self.rank != 0:
                return []
            return [(name, param.detach().cpu().clone()) for name, param in self.module.named_parameters()]

    def export_hf(self, directory: str) -> None:
        """HF format (safetensors, config, generation config, tokenizer with its chat template), written atomically."""
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one small shard per save: the bar would only be noise
        with self.full_parameters(), atomic_directory(directory, self.rank) as partial:
            if self.rank == 0:
                self.module.save_pretrained(partial)
                self.tokenizer.save_pretrained(partial)

    # --- inference ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def greedy_generate(self, prompt_token_ids: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
        """Greedy continuations, one prompt at a time (no padding, so they match an unbatched engine exactly);
        each ends with its EOS token when it stopped before max_tokens."""
        from transformers import GenerationConfig

        eos_ids = self.module.generation_config.eos_token_id
        if eos_ids is None:
            eos_ids = self.tokenizer.eos_token_id
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
        config = GenerationConfig(
            max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(eos_ids), pad_token_id=self.pad_token_id
        )
        self.engine.eval()
        outputs = []
        for prompt in prompt_token_ids:
            input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
            generated = self.module.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                synced_gpus=self.zero3 and self.world_size > 1,
            )[0, input_ids.shape[1] :].tolist()
            outputs.append(cut_after_eos(generated, eos_ids))
        return outputs


def cut_after_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: position + 1]
    return tokens


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: decaying norms and biases toward 0 only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def deepspeed_config(spec: OptimizationSpec, world_size: int, dtype: torch.dtype, hidden_size: int) -> dict[str, Any]:
    # Bucket sizes scaled to the model as transformers' "auto" values do: DeepSpeed's fixed defaults (5e8 elements)
    # cost seconds per step on a small model.
    zero = {
        "stage": spec.zero_stage,
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
        # Otherwise ZeRO-3 replaces torch.nn.functional.linear for the whole process, the reference model included.
        "memory_efficient_linear": False,
    }
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "train_batch_size": spec.micro_batch_size * spec.gradient_accumulation_steps * world_size,
        "gradient_clipping": spec.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # ZeRO around a client torch AdamW works; DeepSpeed just warns
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 2**31,  # progress is ours to report
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def atomic_directory(directory: str, rank: int) -> Iterator[Path]:
    """Every rank writes into `.<name>.partial` beside `directory`; once all are done, rank 0 renames it into
    place, so a reader never sees a half-written directory under the final name."""
    import torch.distributed as dist

    final = Path(directory)
    partial = final.with_name(f".{final.name}.partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash mid-write
        partial.mkdir(parents=True)
    dist.barrier()
    yield partial
    dist.barrier()
    if rank == 0:
        replaced = final.with_name(f".{final.name}.replaced")
        if final.exists():
            os.replace(final, replaced)
        os.replace(partial, final)
        shutil.rmtree(replaced, ignore_errors=True)
    dist.barrier()


# ---------------------------------------------------------------------------------------------------------------------
# The DPO learner
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainStats:
    """Averages over the optimizer steps of one `train_steps` call (NaN when it ran none)."""

    step: int  # optimizer steps of this iteration done so far
    total_steps: int  # optimizer steps of this iteration
    loss: float
    reward_accuracy: float  # share of pairs whose implicit reward beta * (log pi - log ref) ranks chosen first
    margin: float  # mean of chosen reward - rejected reward
    chosen_reward: float
    rejected_reward: float
    learning_rate: float


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


_STAT_FIELDS = ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward")


def mean_stats(per_step: Sequence[dict[str, float]]) -> dict[str, float]:
    names = (*_STAT_FIELDS, "learning_rate")
    return {name: float(np.mean([step[name] for step in per_step])) if per_step else math.nan for name in names}


class DPOLearner:
    """One rank of the DPO learner. The policy stays in memory from iteration to iteration."""

    def __init__(
        self, policy: PolicyConfig, train: TrainConfig, device: str, seed: int, rank: int = 0, world_size: int = 1
    ):
        self._train = train
        self._seed = seed
        self._loss = LOSSES[train.loss_type]
        self._policy = PolicyEngine(policy, OptimizationSpec.from_train(train), device, seed, rank, world_size)
        self._reference_dir = policy.model_path
        self._reference = load_reference(policy.model_path, policy, self._policy.dtype, self._policy.device)
        self._iteration: int | None = None
        self._step = 0
        self._data_fingerprint: str | None = None
        self._pairs: list[TokenizedPair] = []
        self._schedule: list[list[int]] = []

    @property
    def global_batch_size(self) -> int:
        return self._train.micro_batch_size * self._train.gradient_accumulation_steps * self._policy.world_size

    # --- iterations -----------------------------------------------------------------------------------------------

    def begin_iteration(self, iteration: int, pairs: Sequence[Pair], reference_dir: str | None) -> int:
        """Take an iteration's pairs; returns its number of optimizer steps.

        Continues from the loaded checkpoint's step when it belongs to this iteration; otherwise starts at step 0
        (and resets Adam if train.reset_optimizer_each_iteration). `reference_dir` replaces the reference model when
        it differs from the one loaded (reference: previous).
        """
        if reference_dir is not None and not same_path(reference_dir, self._reference_dir):
            policy = self._policy.policy_config
            self._reference = load_reference(reference_dir, policy, self._policy.dtype, self._policy.device)
            self._reference_dir = reference_dir
        tokenized = [self._tokenize(pair) for pair in pairs]
        data_fingerprint = fingerprint([[p.prompt, p.chosen, p.rejected] for p in tokenized])
        if iteration == self._iteration:
            if data_fingerprint != self._data_fingerprint:
                raise ValueError(
                    f"iteration {iteration} resumes from a checkpoint trained on other pairs; "
                    "resume with the iteration's original pairs.jsonl"
                )
        else:
            self._step = 0
            if self._train.reset_optimizer_each_iteration:
                self._policy.reset_optimizer()
        self._iteration = iteration
        self._data_fingerprint = data_fingerprint
        self._pairs = tokenized
        self._schedule = batch_schedule(
            len(tokenized), self._train.epochs, self.global_batch_size, seed_key=(self._seed, iteration)
        )
        return len(self._schedule)

    def _tokenize(self, pair: Pair) -> TokenizedPair:
        limits = (self._train.max_prompt_length, self._train.max_length)
        prompt, chosen = truncate(pair.prompt_token_ids, pair.chosen.token_ids, *limits)
        _, rejected = truncate(pair.prompt_token_ids, pair.rejected.token_ids, *limits)
        return TokenizedPair(prompt, chosen, rejected)

    def train_steps(self, max_steps: int) -> TrainStats:
        """Run up to `max_steps` optimizer steps, stopping at the end of the iteration."""
        if self._iteration is None:
            raise ValueError("call begin_iteration before train_steps")
        end = min(self._step + max_steps, len(self._schedule))
        per_step = []
        progress = tqdm(
            total=end - self._step, desc=f"DPO iteration {self._iteration}", leave=False,
            disable=self._policy.rank != 0 or not sys.stderr.isatty(),  # in an actor, the driver's bar shows progress
        )
        with progress:
            while self._step < end:
                per_step.append(self._train_one_step())
                self._step += 1
                progress.update()
        return TrainStats(step=self._step, total_steps=len(self._schedule), **mean_stats(per_step))

    def _train_one_step(self) -> dict[str, float]:
        learning_rate = learning_rate_at(self._step, len(self._schedule), self._policy.spec)
        global_batch = [self._pairs[index] for index in self._schedule[self._step]]
        micro_batches = rank_micro_batches(
            global_batch, self._policy.rank, self._policy.world_size, self._train.micro_batch_size
        )
        sums = torch.zeros(len(_STAT_FIELDS) + 1, dtype=torch.float64)  # each stat summed over pairs, then pairs

        def loss_of(micro_batch: WeightedMicroBatch) -> torch.Tensor:
            pairs = [pair for pair, _ in micro_batch]
            weights = torch.tensor([weight for _, weight in micro_batch], device=self._policy.device)
            losses, chosen_rewards, rejected_rewards = self._pair_losses(pairs)
            per_pair = torch.stack(
                [losses.detach(), (chosen_rewards > rejected_rewards).float(), chosen_rewards - rejected_rewards,
                 chosen_rewards, rejected_rewards, torch.ones_like(losses)]
            )
            sums.add_((per_pair * weights).sum(-1).double().cpu())
            return (losses * weights).sum() * self._policy.world_size / len(global_batch)

        self._policy.optimizer_step(micro_batches, loss_of, learning_rate)
        totals = self._policy.all_reduce_sum(sums)
        stats = {name: float(totals[i] / totals[-1]) for i, name in enumerate(_STAT_FIELDS)}
        return {**stats, "learning_rate": learning_rate}

    def _pair_losses(self, pairs: Sequence[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pair: the loss, and the implicit rewards beta * (log pi - log ref) of chosen and rejected."""
        sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        batch = pad_batch(sequences, self._policy.pad_token_id, self._policy.device)
        policy_log_probs, lengths = response_log_probs(self._policy.engine, batch)
        with torch.no_grad():
            reference_log_probs, _ = response_log_probs(self._reference, batch)
        log_ratios = policy_log_probs - reference_log_probs
        loss_inputs = log_ratios / lengths.clamp(min=1) if self._loss.average_log_probs else log_ratios
        chosen, rejected = loss_inputs.chunk(2)
        losses = self._loss(chosen, rejected, self._train.beta, self._train.label_smoothing)
        rewards = self._train.beta * log_ratios.detach()
        chosen_rewards, rejected_rewards = rewards.chunk(2)
        return losses, chosen_rewards, rejected_rewards

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str) -> None:
        """Weights, Adam state, iteration, step, data fingerprint and RNG states, written atomically."""
        self._policy.save(
            directory,
            {"trainer": "dpo", "iteration": self._iteration, "step": self._step, "data": self._data_fingerprint},
        )

    def load_checkpoint(self, directory: str) -> None:
        """Restore a checkpoint; the next begin_iteration of the same iteration continues from its step."""
        state = self._policy.load(directory)
        if state.get("trainer") != "dpo":
            raise ValueError(f"{directory} is not a DPO learner checkpoint (it was written by {state.get('trainer')})")
        self._iteration = state["iteration"]
        self._step = state["step"]
        self._data_fingerprint = state["data"]

    # --- weights out and inference --------------------------------------------------------------------------------

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Full weights on CPU under their HF names (vLLM's load_weights takes them as they are). Rank 0 gets them;
        under ZeRO-3 every rank must call it (the gather is collective) and the others get []."""
        return self._policy.named_weights()

    def export_hf(self, directory: str) -> None:
        """HF format, written atomically by rank 0; every rank must call it (it synchronises the ranks)."""
        self._policy.export_hf(directory)

    def greedy_generate(self, prompt_token_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        return self._policy.greedy_generate(prompt_token_ids, max_tokens)

    @torch.no_grad()
    def log_ratios(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]]) -> list[float]:
        """Per sample: sum over response tokens of log pi - log ref (a KL estimate when responses come from pi).
        Sequences are truncated as in training."""
        train = self._train
        sequences = [
            truncate(prompt, response, train.max_prompt_length, train.max_length)
            for prompt, response in zip(prompt_token_ids, response_token_ids, strict=True)
        ]
        self._policy.engine.eval()
        chunk = 2 * train.micro_batch_size
        ratios: list[float] = []
        for start in range(0, len(sequences), chunk):
            batch = pad_batch(sequences[start : start + chunk], self._policy.pad_token_id, self._policy.device)
            policy_log_probs, _ = response_log_probs(self._policy.engine, batch)
            reference_log_probs, _ = response_log_probs(self._reference, batch)
            ratios += (policy_log_probs - reference_log_probs).tolist()
        return ratios
