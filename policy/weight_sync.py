"""Weight sync over a collective: learner rank 0 broadcasts the policy, bucket by bucket, to every engine worker.

    store = host_store()                                     # learner rank 0, once: a TCPStore on a free port
    spec = SyncSpec(host, store.port, "run-1a2b-0", ("learner rank 0", "rollout engine 0", ...), timeout_s=600)
    group = SyncGroup(spec, rank, device, store)             # every rank, once per run: check in, form the group
    group.send(spec.sync, plan, buckets)                     # rank 0, each sync: the plan, then each bucket
    for name, tensor in group.receive(spec.sync): ...       # every other rank, at the same time
    group.shutdown()                                         # every rank, at the end (or when the members change)

One process group serves every sync of a run (gloo for CPU tensors, NCCL for CUDA tensors: the same calls), formed
over a PrefixStore of the learner's store named by `session`, and shut down explicitly; the set-up is paid once.
When the members change (an engine restarted), the driver names a new session and every rank forms the new group.
It never touches the default process group, so DeepSpeed's (learner) and vLLM's (engine) stay as they are. Before the
group forms, every rank checks in on the store; a rank missing after `timeout_s` becomes one line naming it, on every
rank that came. A rank that dies or fails mid-sync would leave the others waiting out `timeout_s`, so the driver,
which sees it first, marks the sync aborted on the store (`abort_sync`): every waiting rank looks there each second
and stops with `WeightSyncAborted` (on CUDA, a broadcast already enqueued still ends at NCCL's own timeout). On the
engines, vLLM's weight-transfer API drives the receiving side (`policy.vllm_weight_transfer`).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from policy.weight_buckets import Bucket, pack_bucket, unpack_bucket
from rlhf_loop.common.errors import UserError


class WeightSyncTimeout(UserError):
    """A rank of the weight-sync group did not arrive (or a broadcast did not finish) in time."""


class WeightSyncAborted(UserError):
    """The driver stopped the sync because another rank failed or died (`abort_sync`)."""


ABORTED_KEY = "aborted"  # in the session's keys: why the driver stopped the sync
LOOK_EVERY_S = 1.0  # how often a waiting rank looks for the abort
POLL_S = 0.005  # how often a waiting rank looks for what it waits for


@dataclass(frozen=True)
class SyncSpec:
    """What every rank needs to join the group and take part in one sync; rank r is `rank_names[r]`, rank 0 sends."""

    host: str  # learner rank 0's address, where its TCPStore listens
    port: int
    session: str  # names the group: one per run and set of members (the store prefix of its keys)
    rank_names: tuple[str, ...]
    timeout_s: float
    timeout_key: str = "rollout.weight_sync_timeout_s"
    sync: int = 0  # numbers the syncs within the group (the store key of each sync's plan)

    @property
    def world_size(self) -> int:
        return len(self.rank_names)

    def next_sync(self, sync: int) -> SyncSpec:
        return replace(self, sync=sync)


def host_store(host: str = "0.0.0.0") -> dist.TCPStore:
    """The store every group meets on, hosted by the sender on a free port (`store.port`)."""
    return dist.TCPStore(host, 0, None, True, timedelta(seconds=60), wait_for_workers=False)


def abort_sync(spec: SyncSpec, reason: str) -> None:
    """Stop every rank of the group `spec.session` that still waits (the driver, when a rank has failed or died):
    each raises WeightSyncAborted within a second or so. The group cannot be used again; the next sync names a new
    one. If the store cannot be reached, the ranks stop at their own timeout instead."""
    try:
        store = dist.TCPStore(spec.host, spec.port, None, False, timedelta(seconds=10))
        dist.PrefixStore(spec.session, store).set(ABORTED_KEY, reason)
    except dist.DistError:
        pass


class SyncGroup:
    """One rank's place in the run's sync group: joined once, used for every sync, shut down explicitly."""

    def __init__(self, spec: SyncSpec, rank: int, device: torch.device, store: dist.Store | None = None):
        """Rank 0 passes its own `store`; the other ranks connect to it. Returns once every rank has checked in."""
        if not 0 <= rank < spec.world_size:
            raise ValueError(f"a rank of this sync group is in 0..{spec.world_size - 1}, got {rank}")
        self.spec, self.rank, self.device = spec, rank, torch.device(device)
        if store is None:
            store = _connect(spec, rank)
        self._store = dist.PrefixStore(spec.session, store)
        self._group: dist.ProcessGroup | None = _join(spec, self._store, rank, self.device)

    def send(self, sync: int, plan: Sequence[Bucket], buckets: Iterable[Sequence[torch.Tensor]]) -> None:
        """Rank 0: publish the plan of sync number `sync`, then broadcast each bucket's tensors (in plan order)."""
        group = self._live()
        self._store.set(f"plan/{sync}", pickle.dumps(list(plan)))
        if sync > 0:
            self._store.delete_key(f"plan/{sync - 1}")  # every rank finished that sync before this one began
        # The next bucket is gathered and flattened while the previous one is on the wire.
        pending = None
        for bucket, tensors in zip(plan, buckets, strict=True):
            buffer = pack_bucket(bucket, tensors, self.device)
            if pending is not None:
                self._finish(*pending)
            pending = (group.broadcast([buffer], _from_rank_0()), buffer)
        if pending is not None:
            self._finish(*pending)
        self._settle()

    def receive(self, sync: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Ranks 1..n: the (HF name, tensor) stream of sync number `sync`, one bucket at a time. The next bucket is
        already on its way while the caller loads this one; each arrives in a buffer of its own (the loader may hold
        on to a bucket's tensors until their layer is complete)."""
        group = self._live()
        if self.rank == 0:
            raise ValueError("rank 0 sends; ranks 1.. receive")
        if not _wait_for_keys(self._store, [f"plan/{sync}"], self.spec, self.rank):
            raise WeightSyncTimeout(
                f"weight sync {self.spec.session}: {self.spec.rank_names[0]} did not start sync {sync} within "
                f"{self.spec.timeout_s:g} s ({self.spec.rank_names[self.rank]} waited); check that role's log, or "
                f"raise {self.spec.timeout_key}")
        plan: list[Bucket] = pickle.loads(self._store.get(f"plan/{sync}"))

        def post(bucket: Bucket):
            buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
            return group.broadcast([buffer], _from_rank_0()), buffer

        pending = post(plan[0]) if plan else None
        for index, bucket in enumerate(plan):
            work, buffer = pending
            self._finish(work, buffer)
            pending = post(plan[index + 1]) if index + 1 < len(plan) else None
            if pending is None:
                self._settle()
            yield from unpack_bucket(bucket, buffer)

    def shutdown(self) -> None:
        """Release the group's resources (communicators, sockets) now, not whenever garbage collection gets to it."""
        if self._group is not None:
            self._group.shutdown()
            self._group = None

    def _live(self) -> dist.ProcessGroup:
        if self._group is None:
            raise RuntimeError(f"weight sync group {self.spec.session} was shut down")
        return self._group

    def _finish(self, work, buffer: torch.Tensor) -> None:
        """Wait for one bucket's broadcast. On gloo, look for the driver's abort every second meanwhile: a rank
        whose sender has failed would otherwise wait until the group's timeout. (NCCL's wait() only orders the
        stream, so there is nothing to interrupt.)"""
        if self.device.type == "cpu":
            _wait_until(work.is_completed, self._store, self.spec, self.rank, timeout_s=None)  # gloo's own timeout
        try:
            work.wait()
        except RuntimeError as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise WeightSyncTimeout(
                f"weight sync {self.spec.session}: a broadcast of {buffer.numel()} bytes failed ({first_line[:160]}); "
                f"a rank died or stalled, or raise {self.spec.timeout_key}") from None

    def _settle(self) -> None:
        """On NCCL, wait() only orders the current stream after the broadcast: the last bucket must have landed
        before its buffer is read or freed (and before the engine generates from the weights)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def _connect(spec: SyncSpec, rank: int) -> dist.TCPStore:
    try:
        return dist.TCPStore(spec.host, spec.port, None, False, timedelta(seconds=spec.timeout_s))
    except dist.DistError as error:
        raise WeightSyncTimeout(
            f"weight sync {spec.session}: {spec.rank_names[rank]} could not reach learner rank 0's store at "
            f"{spec.host}:{spec.port} ({type(error).__name__}); check that the nodes can reach each other on that "
            f"address, or raise {spec.timeout_key}") from None


def _join(spec: SyncSpec, session: dist.Store, rank: int, device: torch.device) -> dist.ProcessGroup:
    """Check in, wait until every rank has, and form the group."""
    session.set(f"arrived/{rank}", "1")
    keys = [f"arrived/{other}" for other in range(spec.world_size)]
    if not _wait_for_keys(session, keys, spec, rank):
        missing = [f"rank {r} ({spec.rank_names[r]})" for r, key in enumerate(keys) if not session.check([key])]
        raise WeightSyncTimeout(
            f"weight sync {spec.session}: {', '.join(missing) or 'a rank'} did not arrive within {spec.timeout_s:g} s "
            f"({spec.rank_names[rank]} waited); check that role's log, or raise {spec.timeout_key}")
    timeout = timedelta(seconds=spec.timeout_s)
    if device.type == "cuda":
        # A group of its own beside DeepSpeed's default one, on a store of our choosing: torch offers no public
        # constructor for that (new_group needs the default group, which vLLM's side does not share).
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(session, rank, spec.world_size, options)
    return dist.ProcessGroupGloo(session, rank, spec.world_size, timeout)


def _wait_for_keys(session: dist.Store, keys: list[str], spec: SyncSpec, rank: int) -> bool:
    """Whether `keys` were all set within `spec.timeout_s`; the driver's abort raises at once. (Polled with
    check(): a store wait() that times out logs a warning each time.)"""
    return _wait_until(lambda: session.check(keys), session, spec, rank, spec.timeout_s)


def _wait_until(ready: Callable[[], bool], session: dist.Store, spec: SyncSpec, rank: int,
                timeout_s: float | None) -> bool:
    """Whether `ready()` came true within `timeout_s` (None: no limit of ours), looking for the driver's abort
    every second meanwhile."""
    start = time.monotonic()
    look_at = start + LOOK_EVERY_S
    while not ready():
        if timeout_s is not None and time.monotonic() - start >= timeout_s:
            return False
        time.sleep(POLL_S)
        if time.monotonic() >= look_at:
            _raise_if_aborted(session, spec, rank)
            look_at += LOOK_EVERY_S
    return True


def _raise_if_aborted(session: dist.Store, spec: SyncSpec, rank: int) -> None:
    if session.check([ABORTED_KEY]):
        reason = session.get(ABORTED_KEY).decode()
        raise WeightSyncAborted(f"weight sync {spec.session}: {spec.rank_names[rank]} stopped waiting: {reason}")


def _from_rank_0() -> dist.BroadcastOptions:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    return options
