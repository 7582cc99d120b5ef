"""The learners in Ray actors: the DPO learner across `train.num_workers` ranks, and the one-rank SFT learner.

    group = LearnerGroup(cfg.policy, cfg.train, device="cuda", seed=cfg.seed)
    group.prepare_pairs(1, first_pairs, reference_dir=None)   # optional, not waited for: ahead of begin_iteration
    total = group.begin_iteration(1, pairs, reference_dir=None)
    stats = group.train_steps(cfg.train.save_steps)
    weights = group.weights_ref()              # an ObjectRef: hand it to the rollout actors as it is (object_store)
    host, port = group.weight_sync_address()   # collective: where rank 0's TCPStore listens
    refs = group.start_weight_broadcast(spec, bucket_bytes)   # while the engines receive (RolloutGroup.sync_from)

    sft = SFTActor(cfg.policy, cfg.sft, device, cfg.seed)   # an SFTLearner in its own actor, same methods

`LearnerGroup` is the loop's `policy.learner_protocol.Learner`; its methods mirror `DPOLearner`'s, except that `weights_ref`
hands out an object-store reference where `DPOLearner.named_weights` returns the list. Training, checkpoints and
export run on every rank (they are collective); weights and inference come from rank 0, or from all ranks under multi-rank ZeRO-3, where every
forward pass and every gather needs all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ray

from policy.config import PolicyConfig, SFTConfig, TrainConfig
from policy.learner import DPOLearner
from policy.learner_protocol import TrainStats
from policy.sft import SFTExample, SFTLearner, SFTStats
from policy.weight_sync import SyncGroup, SyncSpec, host_store
from rlhf_loop.common.actor_calls import placement, wait, wait_ranks
from rlhf_loop.common.network import free_port
from rlhf_loop.common.records import Messages, Pair


SFT_NODE_RESOURCE_SHARE = 0.001  # the label picks the node; the share only has to be non-zero


def learner_resources(device: str, gpus: float = 1.0) -> dict[str, float]:
    """`gpus` GPUs per learner rank on CUDA; no CPU reservation, so learners never block the rollout and reward
    actors from being scheduled on a small machine."""
    return {"num_cpus": 0, "num_gpus": gpus} if device == "cuda" else {"num_cpus": 0}


class SFTActor:
    """An SFTLearner in its own Ray actor (its own process group and port), called like the in-process one."""

    def __init__(self, policy: PolicyConfig, sft: SFTConfig, device: str, seed: int, node_resource: str | None = None):
        """`node_resource`: run on a node with this custom resource (the learner's, cluster.placement.learner)."""
        # SFT runs before any other actor exists, so it may take a whole GPU.
        resources = {"resources": {node_resource: SFT_NODE_RESOURCE_SHARE}} if node_resource else {}
        self._actor = (ray.remote(SFTLearner).options(**learner_resources(device), **resources)
                       .remote(policy, sft, device, seed))
        self._timeout_s = sft.call_timeout_s

    def begin(self, examples: Sequence[SFTExample | Messages]) -> int:
        return self._wait(self._actor.begin.remote(list(examples)), "begin")

    def train_steps(self, max_steps: int) -> SFTStats:
        return self._wait(self._actor.train_steps.remote(max_steps), "train_steps")

    def save_checkpoint(self, directory: str) -> None:
        self._wait(self._actor.save_checkpoint.remote(directory), "save_checkpoint")

    def load_checkpoint(self, directory: str) -> None:
        self._wait(self._actor.load_checkpoint.remote(directory), "load_checkpoint")

    def export_hf(self, directory: str) -> None:
        self._wait(self._actor.export_hf.remote(directory), "export_hf")

    def mean_nll(self, examples: Sequence[SFTExample | Messages]) -> float:
        return self._wait(self._actor.mean_nll.remote(list(examples)), "mean_nll")

    def shutdown(self) -> None:
        ray.kill(self._actor)

    def _wait(self, ref, stage: str):
        return wait(ref, self._timeout_s, "SFT learner", f"SFT {stage}", "sft.call_timeout_s")


class LearnerActor(DPOLearner):
    """A DPOLearner in a Ray actor. Created empty, so that rank 0 can report its address before the ranks meet."""

    def __init__(self):  # the learner itself is built by `start`
        self._sync_store = None  # rank 0's TCPStore for the collective weight sync, started at the first sync
        self._sync_group: SyncGroup | None = None  # rank 0's place in the run's sync group (one per set of members)

    def weight_sync_address(self) -> tuple[str, int]:
        """Rank 0: where the weight-sync store listens (this node's address, a free port)."""
        if self._sync_store is None:
            self._sync_store = host_store()
        return ray.util.get_node_ip_address(), self._sync_store.port

    def send_weights(self, spec: SyncSpec, bucket_bytes: int) -> None:
        """Every rank (ZeRO-3 gathers on all); rank 0 joins the group `spec.session` at its first sync and sends."""
        if self._sync_store is not None and (self._sync_group is None or self._sync_group.spec.session != spec.session):
            self.release_weight_sync()
            self._sync_group = SyncGroup(spec, 0, self._policy.device, self._sync_store)
        self.broadcast_weights(self._sync_group, spec.sync, bucket_bytes)

    def release_weight_sync(self) -> None:
        if self._sync_group is not None:
            self._sync_group.shutdown()
            self._sync_group = None

    def placement(self) -> dict[str, Any]:
        return placement()

    def address(self) -> tuple[str, int]:
        """This node's address and a free port: where the other ranks find rank 0."""
        return ray.util.get_node_ip_address(), free_port()

    def start(
        self, env: dict[str, str], policy: PolicyConfig, train: TrainConfig, device: str, seed: int, rank: int,
        world_size: int,
    ) -> None:
        os.environ.update(env)
        DPOLearner.__init__(self, policy, train, device, seed, rank, world_size)


class LearnerGroup:
    """`train.num_workers` DPO learner ranks, one actor each: the loop's `Learner`."""

    def __init__(self, policy: PolicyConfig, train: TrainConfig, device: str, seed: int,
                 placements: Sequence[dict[str, Any]] | None = None):
        """`placements`: each rank's Ray options for its placement-group bundle (`rlhf_loop.cluster.roles`), rank order;
        without, each rank takes train.gpus_per_worker on CUDA and no CPU, wherever Ray puts it."""
        world_size = train.num_workers
        resources = learner_resources(device, train.gpus_per_worker)
        self._timeout_s = train.call_timeout_s
        self._preparing: list[list[ray.ObjectRef]] = []  # prepare_pairs calls not waited for yet, one ref a rank
        self._actors = [ray.remote(LearnerActor).options(**{**resources, **where}).remote()
                        for where in placements or [{}] * world_size]
        master_addr, master_port = self._wait(self._actors[0].address.remote(), "start-up")
        self._wait(
            [
                actor.start.remote(
                    # LOCAL_RANK 0: Ray shows each actor only its own GPU, as cuda:0.
                    {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                     "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size)},
                    policy, train, device, seed, rank, world_size,
                )
                for rank, actor in enumerate(self._actors)
            ],
            "start-up",
        )
        self._weight_ranks = self._actors if train.zero_stage == 3 and world_size > 1 else self._actors[:1]
        self._sync_address: tuple[str, int] | None = None

    def begin_iteration(self, iteration: int, pairs: Sequence[Pair], reference_dir: str | None,
                        first_step: int = 0, planned_steps: int | None = None) -> int:
        pairs_ref = ray.put(list(pairs))  # stored once, read by every rank
        return self._wait([a.begin_iteration.remote(iteration, pairs_ref, reference_dir, first_step, planned_steps)
                           for a in self._actors], "train")[0]

    def prepare_pairs(self, iteration: int, pairs: Sequence[Pair], reference_dir: str | None) -> None:
        """DPOLearner.prepare_pairs on every rank, not waited for: it returns at once, and each rank runs it before
        whatever is called after it (an actor runs its calls in the order they were made). The ranks compute
        together, so no other thread may call the group meanwhile (the loop calls it from the scoring thread while
        its own thread only generates); a failure comes back at the next call, naming the rank."""
        pairs_ref = ray.put(list(pairs))  # stored once, read by every rank
        self._preparing.append([actor.prepare_pairs.remote(iteration, pairs_ref, reference_dir) for actor in self._actors])

    def train_steps(self, max_steps: int) -> TrainStats:
        """Every rank reports the same all-reduced averages; rank 0's are returned."""
        return self._wait([actor.train_steps.remote(max_steps) for actor in self._actors], "train")[0]

    def save_checkpoint(self, directory: str) -> None:
        self._wait([actor.save_checkpoint.remote(directory) for actor in self._actors], "checkpoint")

    def load_checkpoint(self, directory: str) -> None:
        self._wait([actor.load_checkpoint.remote(directory) for actor in self._actors], "resume")

    def weights_ref(self) -> ray.ObjectRef:
        """A Ray ObjectRef to rank 0's [(HF name, CPU tensor)], put once in the object store; pass it to the rollout
        actors as an argument and Ray hands each the list itself."""
        refs = [actor.named_weights.remote() for actor in self._weight_ranks]
        self._wait(refs[1:], "sync")  # the other ranks only took part in the ZeRO-3 gather (they return [])
        return refs[0]

    def weight_sync_address(self) -> tuple[str, int]:
        """Where rank 0's store for the collective weight sync listens (started at the first call)."""
        if self._sync_address is None:
            self._sync_address = self._wait(self._actors[0].weight_sync_address.remote(), "sync")
        return self._sync_address

    def start_weight_broadcast(self, spec: SyncSpec, bucket_bytes: int) -> list[ray.ObjectRef]:
        """Rank 0's broadcast (and under multi-rank ZeRO-3 the other ranks' gathers), started but not waited for:
        the engines receive at the same time, and the rollout group waits for these refs beside theirs."""
        return [actor.send_weights.remote(spec, bucket_bytes) for actor in self._weight_ranks]

    def offload_states(self) -> None:
        """cluster.colocate: every rank's optimizer state to host memory, its allocator cache emptied."""
        self._wait([actor.offload_states.remote() for actor in self._actors], "offload")

    def reload_states(self) -> None:
        self._wait([actor.reload_states.remote() for actor in self._actors], "reload")

    def export_hf(self, directory: str) -> None:
        self._wait([actor.export_hf.remote(directory) for actor in self._actors], "export")

    def export_adapter(self, directory: str) -> None:
        self._wait([actor.export_adapter.remote(directory) for actor in self._actors], "export")

    def greedy_generate(self, prompt_token_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        return self._wait([a.greedy_generate.remote(prompt_token_ids, max_tokens) for a in self._weight_ranks],
                          "generate")[0]

    def log_ratios(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]],
                   loss_masks: list[list[int] | None] | None = None) -> list[float]:
        return self._wait([a.log_ratios.remote(prompt_token_ids, response_token_ids, loss_masks)
                           for a in self._weight_ranks], "eval")[0]

    def placement(self) -> list[dict[str, Any]]:
        """Where each rank runs (node id, address, pid)."""
        return self._wait([actor.placement.remote() for actor in self._actors], "placement")

    def shutdown(self) -> None:
        """Rank 0 leaves the sync group (if it is still alive), then the ranks go."""
        ray.wait([self._actors[0].release_weight_sync.remote()], timeout=5)  # a busy or dead actor is killed anyway
        for actor in self._actors:
            ray.kill(actor)

    def _wait(self, refs, stage: str):
        """`refs`' results, after the prepare_pairs calls made before them. A rank that fails stops the wait at
        once, named (the other ranks would wait for it in their next collective). A dead rank is not restarted (its
        process group would need every rank anew): the run stops with one line, and `resume` reloads the last
        checkpoint."""
        preparing, self._preparing = self._preparing, []
        for prepared in preparing:
            wait_ranks(prepared, self._timeout_s, "learner", "prepare_pairs", "train.call_timeout_s")
        if isinstance(refs, list):
            return wait_ranks(refs, self._timeout_s, "learner", stage, "train.call_timeout_s")
        return wait(refs, self._timeout_s, "learner", stage, "train.call_timeout_s")
