"""Our backend for vLLM's weight-transfer API: the engine's workers receive the learner's broadcast
(`policy.weight_sync.SyncGroup`) through the same worker calls vLLM's own `nccl` backend answers.

    register()                                                       # before the LLM is built, in its process
    LLM(..., weight_transfer_config={"backend": BACKEND})
    llm.collective_rpc("init_weight_transfer_engine", args=(init_info(spec, first_rank),))   # once per group
    llm.collective_rpc("start_weight_update")                        # each sync: layerwise reload begins
    llm.collective_rpc("update_weights", args=({"sync": spec.sync},))  # buckets arrive and load
    llm.collective_rpc("finish_weight_update")                       # each layer's post-load processing
    llm.collective_rpc("shutdown_weight_transfer_engine")            # the group released

vLLM's `nccl` backend pairs with its trainer-side engine, which must run in the learner's process with vLLM imported
and drive the engines' calls itself; our learner runs DeepSpeed without vLLM and the driver drives the engines. One
sender (gloo on CPU, NCCL on CUDA) serves the learner, and this class is the whole gap (docs/gpu.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from policy.weight_sync import SyncGroup, SyncSpec

BACKEND = "rlhf_loop_collective"


@dataclass
class CollectiveInitInfo(WeightTransferInitInfo):
    """The group to join (a `SyncSpec`'s fields, as plain values) and this engine's first rank in it."""

    host: str
    port: int
    session: str
    rank_names: list[str]
    timeout_s: float
    timeout_key: str
    first_rank: int


@dataclass
class CollectiveUpdateInfo(WeightTransferUpdateInfo):
    sync: int  # which of the group's syncs: names the plan rank 0 publishes on its store


def init_info(spec: SyncSpec, first_rank: int) -> dict:
    return dict(host=spec.host, port=spec.port, session=spec.session, rank_names=list(spec.rank_names),
                timeout_s=spec.timeout_s, timeout_key=spec.timeout_key, first_rank=first_rank)


class CollectiveWeightTransferEngine(WeightTransferEngine[CollectiveInitInfo, CollectiveUpdateInfo]):
    """Receives in checkpoint format (HF names), loaded by the model's own load_weights between the layerwise reload's
    start and finish, as vLLM's `nccl` backend and the worker's `reload_weights` do: the reload defers each layer's
    post-load processing (the CPU kernels' repacking, fused q/k/v) until all of its weights have come, so a layer
    split across two buckets still ends up whole."""

    init_info_cls = CollectiveInitInfo
    update_info_cls = CollectiveUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: SyncGroup | None = None

    def init_transfer_engine(self, init_info: CollectiveInitInfo) -> None:
        self.shutdown()  # a new group replaces the old one (the driver names a new one when the members change)
        spec = SyncSpec(init_info.host, init_info.port, init_info.session, tuple(init_info.rank_names),
                        init_info.timeout_s, init_info.timeout_key)
        # each tensor-parallel worker of the engine takes a rank of its own, in worker order
        self.group = SyncGroup(spec, init_info.first_rank + self.parallel_config.rank, self.device)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        """The base class synchronises `torch.accelerator`, which raises where there is none (CPU); the group
        settles the CUDA stream after the last bucket itself."""
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: CollectiveUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("weight transfer not initialised: call init_weight_transfer_engine first")
        weights = self.group.receive(update_info.sync)
        self.model.load_weights(weights)
        unread = sum(1 for _ in weights)  # the broadcast must run to its end on every rank, or the others would stall
        if unread:
            raise RuntimeError(f"vLLM's load_weights left {unread} weights of the broadcast unread")

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        reprocess_tied_head(self.model)

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None


def reprocess_tied_head(model: torch.nn.Module) -> None:
    """A head tied to the input embeddings shares their weight but receives none of its own in a reload, so vLLM's
    reload never re-runs its post-load processing: on CPU its matmul would go on using the weight it packed at
    start-up (SmolLM2's tied head gave tokens of neither the old nor the new policy). Redo it from the shared weight;
    on CUDA the unquantized head has nothing to process."""
    head = getattr(model, "lm_head", None)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)


def register() -> None:
    """Make BACKEND known to vLLM's factory in this process (the workers are built in it: in-process engine core,
    or processes forked from it); idempotent."""
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, CollectiveWeightTransferEngine)
    except ValueError:  # "already registered": an earlier engine in this process did it
        pass
