"""The rollout actors: `rollout.num_engines` Ray actors, each holding one engine in its own process.

Own processes because vLLM's in-process engine core pins its process's threads (on CPU), and so that the driver
never imports vLLM. A shard's prompts are split into contiguous chunks, one per engine, generated concurrently; since
every prompt samples with its own seed, the result does not depend on how many engines there are, nor on whether an
engine died and was restarted halfway: Ray restarts a dead engine (up to `max_restarts` times), the group gives it
the weights again and has it redo its chunk.

Weights reach the engines in one of two ways (`rollout.weight_sync`). `collective` (default): learner rank 0
broadcasts them, bucket by bucket, over one process group with every engine's workers, formed at the first sync and
kept (`policy.weight_sync`; vLLM's workers receive through its weight-transfer API, `policy.vllm_weight_transfer`);
an engine restarted after a crash gets a sync of its own from the learner in a new group, and the next sync of all
engines forms the group anew. That learner has not trained since the last sync as long as the loop runs its stages
one after another, as it does.
`object_store`: the learner puts one full copy in Ray's object store and every engine loads it; a restarted engine
loads the same copy again.

Warm engines (cluster.keep_warm): given actor names, the group takes the live detached engines of those names, left
by an earlier run with the same settings, and starts the missing ones detached under their names. A reused engine
leaves the earlier run's sync group (its learner is gone) and loads pi_0's weights again, so that the run starts from
where a new engine would; one that Ray restarted (its restart budget no longer whole) or that does not answer is
replaced.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import torch

from policy.colocation import ColocationSchedule, OffloadingLearner
from policy.config import EnvironmentConfig, PolicyConfig, RolloutConfig
from policy.learner_protocol import Learner
from policy.rollout_protocol import RolloutEngine, Sampling
from policy.weight_sync import SyncSpec, WeightSyncAborted, abort_sync
from rlhf_loop.common.actor_calls import (
    REUSE_CHECK_TIMEOUT_S,
    ActorDied,
    detached,
    placement,
    reusable_actor,
    timed_out,
    wait,
    wait_restarted,
    was_restarted,
)
from rlhf_loop.common.console import say
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.faults import fault_env, maybe_kill_actor
from rlhf_loop.common.records import Prompt, Rollout
from rlhf_loop.common.user_code import absolute_reference

NamedTensors = list[tuple[str, torch.Tensor]]


def build_engine(
    policy: PolicyConfig, rollout: RolloutConfig, device: str, max_model_len: int, seed: int, sleeps: bool = False
) -> RolloutEngine:
    """The engine named by rollout.engine; its module is imported here, in the process that will run it. `sleeps`:
    it shares its GPU with the learner and can free it (vLLM's sleep mode)."""
    if rollout.engine == "vllm":
        from policy.vllm_engine import VLLMEngine

        return VLLMEngine(policy, rollout, device, max_model_len, seed, sleep_mode=sleeps)
    if rollout.engine == "hf":
        from policy.hf_engine import HFEngine

        return HFEngine(policy, rollout, device, max_model_len, seed)
    raise ValueError(f"rollout.engine must be vllm or hf, got {rollout.engine!r}")


class EngineActor:
    """One rollout engine in its own Ray worker process; with an environment, it runs episodes with it."""

    def __init__(self, policy: PolicyConfig, rollout: RolloutConfig, device: str, max_model_len: int, seed: int,
                 sleeps: bool = False, environment: EnvironmentConfig | None = None):
        self.engine = build_engine(policy, rollout, device, max_model_len, seed, sleeps)
        self.episodes = None
        if environment is not None and environment.enabled:
            from policy.episodes import EpisodeRunner
            from rlhf_loop.common.hf_models import load_tokenizer

            self.episodes = EpisodeRunner(environment, load_tokenizer(policy.tokenizer_source,
                                                                      policy.trust_remote_code))

    def ready(self) -> None:
        """Returns once the engine is built, so set-up errors surface at start rather than at the first shard."""

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        maybe_kill_actor("rollout")  # the kill tests' RLHF_LOOP_KILL_ACTOR
        if self.episodes is not None:
            return self.episodes.run(self.engine, prompts, sampling)
        return self.engine.generate(prompts, sampling)

    def update_weights(self, named_tensors: NamedTensors) -> None:
        self.engine.update_weights(named_tensors)

    def sleep(self) -> None:
        """Free the GPU for the colocated learner: weights to host memory, KV cache dropped (vLLM sleep level 1)."""
        self.engine.sleep()

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        self.engine.wake_up(tags)

    def receive_weights(self, spec: SyncSpec, first_rank: int) -> None:
        maybe_kill_actor("sync")  # the kill tests' RLHF_LOOP_KILL_ACTOR
        self.engine.receive_weights(spec, first_rank)

    def release_weight_sync(self) -> None:
        self.engine.release_weight_sync()

    def start_run(self) -> None:
        """A warm engine taken by a new run (cluster.keep_warm): it leaves the last run's sync group, whose learner
        is gone, and holds pi_0's weights again, as a new engine would. (It never sleeps: keep_warm refuses
        cluster.colocate.)"""
        self.engine.release_weight_sync()
        self.engine.load_initial_weights()

    def restarted(self) -> bool:
        return was_restarted()

    def placement(self) -> dict[str, Any]:
        return placement()


def start_engine_actor(
    policy: PolicyConfig, rollout: RolloutConfig, device: str, max_model_len: int, seed: int, max_restarts: int = 0,
    placement: dict[str, Any] | None = None, sleeps: bool = False, environment: EnvironmentConfig | None = None,
    name: str | None = None,
) -> ray.actor.ActorHandle:
    """An EngineActor with the resources and environment its device needs (returns before the engine is built).
    `placement`: the Ray options that put it on its placement-group bundle (`rlhf_loop.cluster.roles`); without, it takes
    rollout.gpus_per_engine on CUDA and no CPU. A dead one is restarted by Ray (its engine rebuilt from `policy`)
    up to `max_restarts` times; calls that were in flight fail, and the group redoes them. `name`: a warm engine,
    detached under that name (cluster.keep_warm)."""
    return (
        ray.remote(EngineActor)
        .options(**{**_actor_resources(rollout, device), **(placement or {})}, max_restarts=max_restarts,
                 max_task_retries=0, **detached(name))
        .remote(policy, rollout, device, max_model_len, seed, sleeps, environment)
    )


def _actor_resources(rollout: RolloutConfig, device: str) -> dict:
    if device == "cuda":
        return dict(num_gpus=rollout.gpus_per_engine)
    # CPU: reserve no cores, so that a 2-core machine fits the learner, the reward actor and the engines.
    env_vars = fault_env()  # a test may set them after its Ray cluster started
    if rollout.engine == "vllm":
        # Set before the worker imports vLLM; the explicit KV size also overrides a value inherited from the shell.
        env_vars |= {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(rollout.cpu_kv_cache_gib),
                     "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    return dict(num_cpus=0, runtime_env={"env_vars": env_vars})


class RolloutGroup:
    """`rollout.num_engines` engine actors behind one generate / update_weights call (ray.init done by the caller)."""

    def __init__(self, policy: PolicyConfig, rollout: RolloutConfig, device: str, max_model_len: int, seed: int,
                 max_restarts: int = 0, placements: Sequence[dict[str, Any]] | None = None, sleeps: bool = False,
                 environment: EnvironmentConfig | None = None, names: Sequence[str] | None = None):
        """`placements`: each engine's Ray options for its placement-group bundle (see `start_engine_actor`).
        `sleeps`: the engines share GPUs with the learner (cluster.colocate) and free them in `asleep`.
        `environment`: the engines run its episodes (`policy.episodes`) where they would sample single turns.
        `names`: warm engines (cluster.keep_warm), one name each: the live ones of those names are reused (`reused`
        says which), the others started detached."""
        placements = placements or [None] * rollout.num_engines
        if environment is not None:
            environment = dataclasses.replace(environment, factory=absolute_reference(environment.factory))
        kept = ([reusable_actor(name, REUSE_CHECK_TIMEOUT_S) for name in names] if names is not None
                else [None] * len(placements))
        self.actors = [actor or start_engine_actor(policy, rollout, device, max_model_len, seed, max_restarts, where,
                                                   sleeps, environment, name)
                       for actor, where, name in zip(kept, placements, names or [None] * len(placements), strict=True)]
        self.reused = [actor is not None for actor in kept]
        self.sleeps = sleeps
        self.timeout_s = rollout.call_timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0  # engines restarted so far, over the whole group
        self.weight_sync = rollout.weight_sync
        self._bucket_bytes = rollout.weight_sync_bucket_bytes
        self._sync_timeout_s = rollout.weight_sync_timeout_s
        # vLLM on CUDA runs one worker per tensor-parallel GPU, and each joins the broadcast
        self._workers = rollout.tensor_parallel_size if device == "cuda" and rollout.engine == "vllm" else 1
        # collective: one sync group while the members stay the same; a restarted engine makes the next group
        self._session = uuid.uuid4().hex[:8]  # group names stay unique on a learner store that outlives this object
        self._groups = 0
        self._members: tuple[int, ...] | None = None  # the engines in the current group
        self._syncs_in_group = 0
        self._weights_ref: ray.ObjectRef | None = None  # object_store: the last synced weights, for a restart
        self._learner: Learner | None = None  # collective: where a restarted engine gets the weights again
        self._weights_dir: Path | None = None  # ... or their export, once the learner has moved past them
        self._schedule: ColocationSchedule | None = None  # sleeps: set at the first `asleep`
        self._wait([actor.ready.remote() for actor in self.actors], "start-up")
        self._wait([actor.start_run.remote() for actor, reused in zip(self.actors, self.reused) if reused], "start-up")

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        """K responses per prompt, in prompt order; each engine takes one contiguous chunk of the prompts."""
        if self._schedule is not None:
            self._schedule.before_generating()
        chunks = [chunk for chunk in contiguous_chunks(prompts, len(self.actors)) if chunk]
        parts = self._call_each("generate", [(chunk, sampling) for chunk in chunks])
        return [rollout for part in parts for rollout in part]

    def sync_from(self, learner: Learner) -> None:
        """The learner's current weights into every engine, by `rollout.weight_sync`."""
        if self.weight_sync == "object_store":
            self._learner = None
            self.update_weights(learner.weights_ref())
        else:
            # no older copy kept in the object store
            self._learner, self._weights_ref, self._weights_dir = learner, None, None
            self._broadcast(learner, range(len(self.actors)))

    def update_weights(self, named_tensors_ref: ray.ObjectRef) -> None:
        """Load the (name, tensor) list behind the ref into every engine (the list sits once in the object store)."""
        self._learner, self._weights_ref, self._weights_dir = None, named_tensors_ref, None
        self._call_each("update_weights", [(named_tensors_ref,)] * len(self.actors))

    def let_learner_move_on(self, export: Path | None) -> None:
        """The engines go on sampling from the weights they hold while the learner trains further (max_staleness 1),
        so a restarted engine must get those weights again from their `export` (None: the initial policy, which Ray
        rebuilds an engine from), not the learner's newer ones."""
        if self._learner is not None:
            self._learner, self._weights_dir = None, export

    def _broadcast(self, learner: Learner, indices: Sequence[int]) -> None:
        """Learner rank 0 sends, the engines `indices` receive, all at once. Ranks: 0 the learner, then each
        engine's workers in turn. An engine that dies meanwhile is restarted, as long as restarts are left, and the
        sync done again in a new group."""
        while True:
            spec = self._next_sync(learner, indices)
            sending = learner.start_weight_broadcast(spec, self._bucket_bytes)
            receiving = [self.actors[index].receive_weights.remote(spec, 1 + position * self._workers)
                         for position, index in enumerate(indices)]
            died = self._finish_sync(spec, sending, dict(zip(receiving, indices)))
            if died is None:
                return
            index, error = died
            if self.restarts >= self.max_restarts:
                raise error
            self._restart(index, "sync")

    def _next_sync(self, learner: Learner, indices: Sequence[int]) -> SyncSpec:
        host, port = learner.weight_sync_address()
        indices = tuple(indices)
        if indices != self._members:
            self._groups, self._members, self._syncs_in_group = self._groups + 1, indices, 0
        names = ["learner rank 0"] + [f"rollout engine {index}" + (f" worker {worker}" if self._workers > 1 else "")
                                      for index in indices for worker in range(self._workers)]
        spec = SyncSpec(host, port, f"group-{self._groups}-{self._session}", tuple(names), self._sync_timeout_s,
                        sync=self._syncs_in_group)
        self._syncs_in_group += 1
        return spec

    def _finish_sync(self, spec: SyncSpec, sending: list[ray.ObjectRef],
                     receiving: dict[ray.ObjectRef, int]) -> tuple[int, ActorDied] | None:
        """Wait for every rank of the sync (`receiving`: each engine's ref and index). The first rank to fail or die
        aborts the sync for the others, which would otherwise wait for it until rollout.weight_sync_timeout_s.
        Returns None if all went well, or the engine that died and the error that says so; any other failure is
        raised (the cause, not the aborts it set off)."""
        roles = {ref: f"learner rank {rank}" for rank, ref in enumerate(sending)}
        roles |= {ref: f"rollout engine {index}" for ref, index in receiving.items()}
        failures: list[tuple[ray.ObjectRef, Exception]] = []
        pending = list(roles)
        deadline = time.monotonic() + self.timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                raise timed_out(roles[pending[0]], "sync", self.timeout_s, "rollout.call_timeout_s")
            try:
                wait(ready[0], max(deadline - time.monotonic(), 0.1), roles[ready[0]], "sync", "rollout.call_timeout_s")
            except (UserError, ray.exceptions.RayError) as error:
                if not failures:
                    what = "died" if isinstance(error, ActorDied) else f"failed ({type(error).__name__})"
                    abort_sync(spec, f"{roles[ready[0]]} {what}")
                failures.append((ready[0], error))
        if not failures:
            return None
        self._members = None  # an aborted group is not used again
        for ref, error in failures:
            if ref in receiving and isinstance(error, ActorDied):
                return receiving[ref], error
        raise next((error for _, error in failures if not isinstance(error, WeightSyncAborted)), failures[0][1])

    def greedy(self, prompts: Sequence[Prompt], max_tokens: int) -> list[list[list[int]]]:
        """Every engine's greedy token ids for every prompt: [engine][prompt] -> token ids (to check weight sync)."""
        sampling = Sampling(n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0)
        per_engine = self._call_each("generate", [(prompts, sampling)] * len(self.actors))
        return [[rollout.responses[0].token_ids for rollout in rollouts] for rollouts in per_engine]

    @contextmanager
    def asleep(self, learner: OffloadingLearner | None = None) -> Iterator[None]:
        """Colocated engines (`sleeps`) free their GPUs for the block, in the order of `ColocationSchedule`: the
        learner's state comes back for the block and leaves after it, then the engines' weights wake (for the sync)
        and their KV cache at the next generate. Engines of their own do nothing."""
        if not self.sleeps:
            yield
            return
        self._schedule = ColocationSchedule(self, learner or _StatesStay())
        with self._schedule.training():
            yield

    def sleep(self) -> None:
        self._call_each("sleep", [()] * len(self.actors))

    def wake_up(self, tags: Sequence[str]) -> None:
        self._call_each("wake_up", [(tags,)] * len(self.actors))

    def placement(self) -> list[dict[str, Any]]:
        """Where each engine runs (node id, address, pid)."""
        return self._call_each("placement", [()] * len(self.actors))

    def _call_each(self, method: str, arguments: Sequence[tuple]) -> list[Any]:
        """`method` on the first len(arguments) engines at once; an engine that died is restarted (it gets the last
        synced weights again) and redoes its call, as long as restarts are left."""
        refs = [getattr(actor, method).remote(*args) for actor, args in zip(self.actors, arguments)]
        results = []
        for index, (ref, args) in enumerate(zip(refs, arguments)):
            while True:
                try:
                    results.append(self._wait(ref, method, index))
                    break
                except ActorDied:
                    if self.restarts >= self.max_restarts:
                        raise
                    self._recover(index, method)
                    ref = getattr(self.actors[index], method).remote(*args)
        return results

    def _recover(self, index: int, stage: str) -> None:
        """Restart the engine and give it the weights the others hold."""
        self._restart(index, stage)
        actor = self.actors[index]
        if self._learner is not None:
            self._broadcast(self._learner, [index])
        elif self._weights_dir is not None:
            self._weights_ref, self._weights_dir = ray.put(exported_weights(self._weights_dir)), None
        if self._learner is None and self._weights_ref is not None:
            self._wait(actor.update_weights.remote(self._weights_ref), "restart", index)

    def _restart(self, index: int, stage: str) -> None:
        """Wait until Ray has rebuilt the dead engine `index`, from the initial policy (the caller gives it the
        weights again)."""
        self.restarts += 1
        say(f"rlhf-loop: rollout engine {index} died during {stage}; restarted it ({self.restarts} of "
            f"{self.max_restarts} restarts) and redoing its work")
        wait_restarted(self.actors[index].ready.remote, self.timeout_s, f"rollout engine {index}",
                       "rollout.call_timeout_s")
        self._members = None  # the new process is in no sync group: the next sync forms one

    def _wait(self, refs: Any, stage: str, index: int | None = None) -> Any:
        role = "rollout engines" if index is None else f"rollout engine {index}"
        return wait(refs, self.timeout_s, role, stage, "rollout.call_timeout_s")

    def shutdown(self) -> None:
        """Each engine leaves the sync group (a dead one has nothing to release), then the actors go."""
        ray.wait([actor.release_weight_sync.remote() for actor in self.actors], num_returns=len(self.actors),
                 timeout=5)  # a busy or dead engine is killed anyway
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class _StatesStay:
    """A learner whose state stays where it is (no learner given to `asleep`)."""

    def reload_states(self) -> None:
        pass

    def offload_states(self) -> None:
        pass


def exported_weights(directory: Path) -> NamedTensors:
    """[(HF name, tensor)] of an exported policy (safetensors; merged under LoRA, as the learner hands them out)."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory} holds no exported policy (no *.safetensors): the engines cannot be given the "
                        f"weights that this iteration samples from; restore it, or start the run again")
    return [item for path in files for item in load_file(path).items()]


def contiguous_chunks(items: Sequence, num_chunks: int) -> list[list]:
    """`items` cut into `num_chunks` contiguous runs whose sizes differ by at most one (some may be empty)."""
    size, extra = divmod(len(items), num_chunks)
    bounds = [i * size + min(i, extra) for i in range(num_chunks + 1)]
    return [list(items[start:end]) for start, end in zip(bounds, bounds[1:])]
