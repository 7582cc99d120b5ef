"""The policy inside a DeepSpeed engine: process-group set-up, model loading, and `DeepSpeedPolicy`, what the DPO and SFT
learners share (the optimizer step, atomic checkpoints, weight gathering, HF export, greedy generation)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policy.batching import WeightedMicroBatch
from policy.config import LoRAConfig, PolicyConfig
from policy.optimization import OptimizationSpec, parameter_groups
from policy.weight_buckets import Bucket, plan_buckets
from policy.weight_sources import WeightSource, weight_sources
from policy.weight_sync import SyncGroup
from rlhf_loop.common.faults import maybe_kill
from rlhf_loop.common.files import atomic_directory
from rlhf_loop.common.hf_models import load_tokenizer, torch_dtype
from rlhf_loop.common.network import free_port

_ENGINE_TAG = "engine"  # DeepSpeed's sub-directory inside a checkpoint directory


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
    keep_op_builds_apart()
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")


def keep_op_builds_apart() -> None:
    """DeepSpeed JIT-builds its C++ ops (the CPU shared-memory comm op: 25-50 s on 2 cores) into torch's extension
    directory, which is shared by every Python environment of the same Python version: two environments with
    different torch or DeepSpeed builds rebuild the op for each other at every start. One directory per environment
    (and torch version) keeps each build, so only an environment's first start compiles. TORCH_EXTENSIONS_DIR, when
    set, wins."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return
    import hashlib
    import sys

    from torch.utils.cpp_extension import get_default_build_root

    environment = hashlib.sha256(f"{sys.prefix}|{torch.__version__}".encode()).hexdigest()[:12]
    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(get_default_build_root(), f"rlhf-loop-{environment}")


def torch_device(device: str) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    raise ValueError(f"device must be cpu or cuda, got {device!r}")


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
    """Every RNG's state in types `torch.load(weights_only=True)` reads back: numpy's key array as a tensor."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position,
                                                    has_gauss, cached_gaussian), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


class DeepSpeedPolicy:
    """pi_theta inside a DeepSpeed engine, and what every trainer of it needs."""

    def __init__(
        self, policy: PolicyConfig, spec: OptimizationSpec, device: str, seed: int, rank: int, world_size: int,
        lora: LoRAConfig | None = None,
    ):
        """With `lora` enabled the engine trains adapters on the frozen policy; weights leave it merged."""
        init_distributed(device, rank, world_size)
        import deepspeed

        torch.manual_seed(seed)
        self.policy_config = policy
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.device = torch_device(device)
        self.dtype = torch_dtype(policy.dtype, device)
        self.tokenizer = load_tokenizer(policy.tokenizer_source, policy.trust_remote_code)
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        model = load_causal_lm(policy.model_path, policy, self.dtype, self.device)
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lora = lora is not None and lora.enabled
        if self.lora:
            from peft import get_peft_model

            model = get_peft_model(model, lora.peft_config())
        # A plain torch AdamW: DeepSpeed's own Adam kernels would need a JIT build per machine.
        self.optimizer = torch.optim.AdamW(parameter_groups(model, spec.weight_decay), lr=spec.learning_rate)
        hidden_size = model.config.get_text_config().hidden_size
        config = deepspeed_config(spec, self.dtype, hidden_size)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def zero3(self) -> bool:
        return self.spec.zero_stage == 3

    def offload_states(self) -> None:
        """cluster.colocate, after training: the optimizer state to host memory (DeepSpeed's offload_states, which
        its ZeRO 1-3 optimizers implement) and the allocator's cached blocks back to the device, so that the
        colocated engine can wake. Nothing to do off CUDA."""
        if self.device.type != "cuda":
            return
        if self.spec.zero_stage >= 1:
            from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

            self.engine.offload_states(include=[OffloadStateTypeEnum.optim_states])
        torch.cuda.empty_cache()

    def reload_states(self) -> None:
        """Before training: the optimizer state back on the GPU."""
        if self.device.type == "cuda" and self.spec.zero_stage >= 1:
            self.engine.reload_states()

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

    def _atomic_directory(self, directory: str) -> contextlib.AbstractContextManager[Path]:
        """`directory` written by every rank into a staging directory, which rank 0 fsyncs and renames into place
        once all are done (so a checkpoint or export is on disk before the manifest records it)."""
        import torch.distributed as dist

        return atomic_directory(directory, barrier=dist.barrier, owner=self.rank == 0)

    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        """Weights, optimizer state, `client_state` and every rank's RNG states, written atomically."""
        with self._atomic_directory(directory) as partial:
            self.engine.save_checkpoint(str(partial), tag=_ENGINE_TAG, client_state=client_state, save_latest=False)
            torch.save(rng_states(), partial / f"rng_rank{self.rank}.pt")
            maybe_kill(f"checkpoint:{Path(directory).parent.parent.name}/{Path(directory).name}")  # kill tests

    def load(self, directory: str, trainer: str, description: str) -> dict[str, Any]:
        """Restore what `save` wrote; returns the client state. Refuses a checkpoint whose client state names another
        trainer than `trainer` (`description` says what was expected: "an SFT checkpoint")."""
        if not (Path(directory) / _ENGINE_TAG).is_dir():
            raise ValueError(f"{directory} is not a learner checkpoint (no {_ENGINE_TAG}/ inside)")
        _, client_state = self.engine.load_checkpoint(
            directory, tag=_ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if client_state.get("trainer") != trainer:
            raise ValueError(f"{directory} is not {description} (it was written by {client_state.get('trainer')})")
        set_rng_states(torch.load(Path(directory) / f"rng_rank{self.rank}.pt", weights_only=True))
        return client_state

    # --- weights out ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        """Under ZeRO-3 every rank holds a slice of each parameter: gather them (a collective, all ranks enter)."""
        if not self.zero3:
            yield
            return
        with self._gathered(list(self.module.parameters())):
            yield

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Full weights on CPU for rank 0 (adapters merged in, under the base model's names); other ranks only take
        part in the ZeRO-3 gather and get []."""
        with self.full_parameters():
            if self.rank != 0:
                return []
            return [(source.name, source.value().cpu().clone()) for source in weight_sources(self.module, self.lora)]

    def broadcast_weights(self, group: SyncGroup | None, sync: int, bucket_bytes: int) -> None:
        """Rank 0 sends the weights to the engines as sync number `sync` of its sync `group`, bucket by bucket;
        under ZeRO-3 every rank must call it (group None but on rank 0), since each bucket is gathered from all
        ranks first."""
        sources = weight_sources(self.module, self.lora)
        plan = plan_buckets([(source.name, source.shape, source.dtype) for source in sources], bucket_bytes)
        buckets = self._gathered_buckets(plan, sources)
        if self.rank == 0:
            group.send(sync, plan, buckets)
        else:
            for _ in buckets:  # only the gathers
                pass

    def _gathered_buckets(
        self, plan: Sequence[Bucket], sources: Sequence[WeightSource]
    ) -> Iterator[list[torch.Tensor]]:
        """Each bucket's full tensors in turn; under ZeRO-3 only that bucket's parameters are gathered."""
        start = 0
        for bucket in plan:
            chosen = sources[start : start + len(bucket.slots)]
            start += len(bucket.slots)
            params = list(dict.fromkeys(param for source in chosen for param in source.params))  # LoRA: shared
            gather = self._gathered(params) if self.zero3 else contextlib.nullcontext()
            with gather:
                yield [source.value() for source in chosen] if self.rank == 0 else []

    def _gathered(self, params: Sequence[torch.nn.Parameter]):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)

    def export_hf(self, directory: str) -> None:
        """HF format (safetensors, config, generation config, tokenizer with its chat template), written atomically;
        with LoRA, the merged weights."""
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one small shard per save: the bar would only be noise
        with self.full_parameters(), self._atomic_directory(directory) as partial:
            if self.rank == 0:
                if self.lora:
                    merged = {source.name: source.value().cpu() for source in weight_sources(self.module, True)}
                    self.module.get_base_model().save_pretrained(partial, state_dict=merged)
                else:
                    self.module.save_pretrained(partial)
                self.tokenizer.save_pretrained(partial)

    def export_adapter(self, directory: str) -> None:
        """The LoRA adapter alone in peft's format (adapter_config.json, adapter_model.safetensors), atomically."""
        with self.full_parameters(), self._atomic_directory(directory) as partial:
            if self.rank == 0:
                self.module.save_pretrained(partial)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The frozen base policy, pi_0: what the LoRA policy computes with its adapters switched off."""
        with self.module.disable_adapter():
            yield

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


def deepspeed_config(spec: OptimizationSpec, dtype: torch.dtype, hidden_size: int) -> dict[str, Any]:
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
        "train_batch_size": spec.global_batch_size,
        "gradient_clipping": spec.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # ZeRO around a client torch AdamW works; DeepSpeed just warns
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 2**31,  # progress is ours to report
        "wall_clock_breakdown": False,
    }


