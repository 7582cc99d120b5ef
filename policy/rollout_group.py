"""The rollout actors: `rollout.num_engines` Ray actors, each holding one engine in its own process.

Own processes because vLLM's in-process engine core pins its process's threads (on CPU), and so that the driver
never imports vLLM. A shard's prompts are split into contiguous chunks, one per engine, generated concurrently; since
every prompt samples with its own seed, the result does not depend on how many engines there are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ray
import torch

from policy.config import PolicyConfig, RolloutConfig
from policy.rollout import RolloutEngine, Sampling
from rlhf_loop.records import Prompt, Rollout

NamedTensors = list[tuple[str, torch.Tensor]]


def build_engine(
    policy: PolicyConfig, rollout: RolloutConfig, device: str, max_model_len: int, seed: int
) -> RolloutEngine:
    """The engine named by rollout.engine; its module is imported here, in the process that will run it."""
    if rollout.engine == "vllm":
        from policy.vllm_engine import VLLMEngine

        return VLLMEngine(policy, rollout, device, max_model_len, seed)
    if rollout.engine == "hf":
        from policy.hf_engine import HFEngine

        return HFEngine(policy, rollout, device, max_model_len, seed)
    raise ValueError(f"rollout.engine must be vllm or hf, got {rollout.engine!r}")


class EngineActor:
    """One rollout engine in its own Ray worker process."""

    def __init__(self, policy: PolicyConfig, rollout: RolloutConfig, device: str, max_model_len: int, seed: int):
        self.engine = build_engine(policy, rollout, device, max_model_len, seed)

    def ready(self) -> None:
        """Returns once the engine is built, so set-up errors surface at start rather than at the first shard."""

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        return self.engine.generate(prompts, sampling)

    def update_weights(self, named_tensors: NamedTensors) -> None:
        self.engine.update_weights(named_tensors)


def start_engine_actor(
    policy: PolicyConfig, rollout: RolloutConfig, device: str, max_model_len: int, seed: int
) -> ray.actor.ActorHandle:
    """An EngineActor with the resources and environment its device needs (returns before the engine is built)."""
    return (
        ray.remote(EngineActor)
        .options(**_actor_resources(rollout, device))
        .remote(policy, rollout, device, max_model_len, seed)
    )


def _actor_resources(rollout: RolloutConfig, device: str) -> dict:
    if device == "cuda":
        return dict(num_gpus=rollout.gpus_per_engine)
    # CPU: reserve no cores, so that a 2-core machine fits the learner, the reward actor and the engines.
    env_vars = {}
    if rollout.engine == "vllm":
        # Set before the worker imports vLLM; the explicit KV size also overrides a value inherited from the shell.
        env_vars = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(rollout.cpu_kv_cache_gib),
                    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    return dict(num_cpus=0, runtime_env={"env_vars": env_vars})


class RolloutGroup:
    """`rollout.num_engines` engine actors behind one generate / update_weights call (ray.init done by the caller)."""

    def __init__(self, policy: PolicyConfig, rollout: RolloutConfig, device: str, max_model_len: int, seed: int):
        self.actors = [
            start_engine_actor(policy, rollout, device, max_model_len, seed) for _ in range(rollout.num_engines)
        ]
        ray.get([actor.ready.remote() for actor in self.actors])

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        """K responses per prompt, in prompt order; each engine takes one contiguous chunk of the prompts."""
        chunks = [chunk for chunk in contiguous_chunks(prompts, len(self.actors)) if chunk]
        parts = ray.get([actor.generate.remote(chunk, sampling) for actor, chunk in zip(self.actors, chunks)])
        return [rollout for part in parts for rollout in part]

    def update_weights(self, named_tensors_ref: ray.ObjectRef) -> None:
        """Load the (name, tensor) list behind the ref into every engine (the list sits once in the object store)."""
        ray.get([actor.update_weights.remote(named_tensors_ref) for actor in self.actors])

    def greedy(self, prompts: Sequence[Prompt], max_tokens: int) -> list[list[list[int]]]:
        """Every engine's greedy token ids for every prompt: [engine][prompt] -> token ids (to check weight sync)."""
        sampling = Sampling(n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0)
        per_engine = ray.get([actor.generate.remote(prompts, sampling) for actor in self.actors])
        return [[rollout.responses[0].token_ids for rollout in rollouts] for rollouts in per_engine]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def contiguous_chunks(items: Sequence, num_chunks: int) -> list[list]:
    """`items` cut into `num_chunks` contiguous runs whose sizes differ by at most one (some may be empty)."""
    size, extra = divmod(len(items), num_chunks)
    bounds = [i * size + min(i, extra) for i in range(num_chunks + 1)]
    return [list(items[start:end]) for start, end in zip(bounds, bounds[1:])]
