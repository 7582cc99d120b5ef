"""Weight sync over a collective: learner rank 0 broadcasts the policy, bucket by bucket, to every engine worker.

    store = host_store()                                   # learner rank 0, once: a TCPStore on a free port
    spec = SyncSpec(host, store.port, "sync-3", ("learner rank 0", "rollout engine 0", ...), timeout_s=600)
    send(spec, store, plan, buckets)                        # rank 0: plan from plan_buckets, then each bucket's tensors
    for name, tensor in receive(spec, rank, device): ...    # every other rank, at the same time: a stream of weights

Each sync builds its own process group (gloo for CPU tensors, NCCL for CUDA tensors: the same calls) over a
PrefixStore of the learner's store, named by the sync's session, and drops it afterwards. It never touches the
default process group, so DeepSpeed's (learner) and vLLM's (engine) stay as they are; and an engine restarted since
the last sync simply joins the next one. Before the group forms, every rank checks in on the store; a rank missing
after `timeout_s` becomes one line naming it, on every rank that came.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from policy.weight_buckets import Bucket, pack_bucket, unpack_bucket
from rlhf_loop.common.errors import UserError


class WeightSyncTimeout(UserError):
    """A rank of the weight-sync group did not arrive (or a broadcast did not finish) in time."""


@dataclass(frozen=True)
class SyncSpec:
    """What every rank needs to join one sync; rank r is `rank_names[r]`, rank 0 is the sender."""

    host: str  # learner rank 0's address, where its TCPStore listens
    port: int
    session: str  # unique per sync: the store prefix of this sync's keys
    rank_names: tuple[str, ...]
    timeout_s: float
    timeout_key: str = "rollout.weight_sync_timeout_s"

    @property
    def world_size(self) -> int:
        return len(self.rank_names)


def host_store(host: str = "0.0.0.0") -> dist.TCPStore:
    """The store every sync meets on, hosted by the sender on a free port (`store.port`)."""
    return dist.TCPStore(host, 0, None, True, timedelta(seconds=60), wait_for_workers=False)


def send(spec: SyncSpec, store: dist.Store, plan: Sequence[Bucket], buckets: Iterable[Sequence[torch.Tensor]],
         device: torch.device) -> None:
    """Rank 0: publish the plan, wait for every rank, then broadcast each bucket's tensors (in plan order)."""
    session = dist.PrefixStore(spec.session, store)
    session.set("plan", pickle.dumps(list(plan)))
    group = _join(spec, session, 0, device)
    # The next bucket is gathered and flattened while the previous one is on the wire.
    pending = None
    for bucket, tensors in zip(plan, buckets, strict=True):
        buffer = pack_bucket(bucket, tensors, device)
        if pending is not None:
            _finish(spec, *pending)
        pending = (group.broadcast([buffer], _from_rank_0()), buffer)
    if pending is not None:
        _finish(spec, *pending)


def receive(spec: SyncSpec, rank: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Ranks 1..n: the (HF name, tensor) stream rank 0 sends, one bucket at a time. The next bucket is already on its
    way while the caller loads this one; each arrives in a buffer of its own (the loader may hold on to a bucket's
    tensors until their layer is complete)."""
    if not 0 < rank < spec.world_size:
        raise ValueError(f"a receiving rank is in 1..{spec.world_size - 1}, got {rank}")
    try:
        store = dist.TCPStore(spec.host, spec.port, None, False, timedelta(seconds=spec.timeout_s))
    except dist.DistError as error:
        raise WeightSyncTimeout(
            f"weight sync {spec.session}: {spec.rank_names[rank]} could not reach learner rank 0's store at "
            f"{spec.host}:{spec.port} ({type(error).__name__}); check that the nodes can reach each other on that "
            f"address, or raise {spec.timeout_key}") from None
    session = dist.PrefixStore(spec.session, store)
    group = _join(spec, session, rank, device)
    plan: list[Bucket] = pickle.loads(session.get("plan"))

    def post(bucket: Bucket):
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
        return group.broadcast([buffer], _from_rank_0()), buffer

    pending = post(plan[0]) if plan else None
    for index, bucket in enumerate(plan):
        work, buffer = pending
        _finish(spec, work, buffer)
        pending = post(plan[index + 1]) if index + 1 < len(plan) else None
        yield from unpack_bucket(bucket, buffer)


def _join(spec: SyncSpec, session: dist.Store, rank: int, device: torch.device) -> dist.ProcessGroup:
    """Check in, wait until every rank has, and form this sync's process group."""
    session.set(f"arrived/{rank}", "1")
    keys = [f"arrived/{other}" for other in range(spec.world_size)]
    try:
        session.wait(keys, timedelta(seconds=spec.timeout_s))
    except dist.DistStoreError:
        missing = [f"rank {r} ({spec.rank_names[r]})" for r, key in enumerate(keys) if not session.check([key])]
        raise WeightSyncTimeout(
            f"weight sync {spec.session}: {', '.join(missing) or 'a rank'} did not arrive within {spec.timeout_s:g} s "
            f"({spec.rank_names[rank]} waited); check that role's log, or raise {spec.timeout_key}") from None
    timeout = timedelta(seconds=spec.timeout_s)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(session, rank, spec.world_size, options)
    return dist.ProcessGroupGloo(session, rank, spec.world_size, timeout)


def _from_rank_0() -> dist.BroadcastOptions:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    return options


def _finish(spec: SyncSpec, work, buffer: torch.Tensor) -> None:
    try:
        work.wait()
    except RuntimeError as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise WeightSyncTimeout(f"weight sync {spec.session}: a broadcast of {buffer.numel()} bytes failed "
                                f"({first_line[:160]}); a rank died or stalled, or raise {spec.timeout_key}") from None
