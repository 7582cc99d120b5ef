"""Weights cut into buckets for the collective sync: each bucket travels as one flat byte buffer.

    plan = plan_buckets([(name, shape, dtype), ...], bucket_bytes=256 << 20)   # same order as the tensors
    buffer = pack_bucket(plan[0], tensors_of_bucket_0)                            # sender
    named = unpack_bucket(plan[0], buffer)                                         # receiver: views into buffer

A bucket packs consecutive tensors until the next would overflow `bucket_bytes`; a tensor larger than the bucket
size travels alone in a bucket of its own. Tensors of different dtypes share a buffer as raw bytes, each starting at
an aligned offset, so the receiver's views are bit-identical to the sender's tensors. Pure torch: no process group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from rlhf_loop.common.arithmetic import ceil_div

ALIGN_BYTES = 64  # every tensor starts at a multiple of this: any dtype's view is aligned (and GPU copies stay fast)


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lies in its bucket's buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the buffer's start
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    slots: tuple[TensorSlot, ...]
    nbytes: int  # buffer size, alignment padding included


def plan_buckets(tensors: Iterable[tuple[str, Sequence[int], torch.dtype]], bucket_bytes: int) -> list[Bucket]:
    """Consecutive (name, shape, dtype) grouped into buckets of at most `bucket_bytes` (a larger tensor alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[Bucket] = []
    slots: list[TensorSlot] = []
    used = 0
    for name, shape, dtype in tensors:
        shape = tuple(int(size) for size in shape)
        nbytes = _numel(shape) * dtype.itemsize
        offset = _aligned(used)
        if slots and offset + nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(slots), used))
            slots, offset = [], 0
        slots.append(TensorSlot(name, shape, dtype, offset, nbytes))
        used = offset + nbytes
    if slots:
        buckets.append(Bucket(tuple(slots), used))
    return buckets


def pack_bucket(bucket: Bucket, tensors: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """The bucket's tensors copied into one new uint8 buffer on `device`."""
    if len(tensors) != len(bucket.slots):
        raise ValueError(f"bucket has {len(bucket.slots)} slots, got {len(tensors)} tensors")
    buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
    for slot, tensor in zip(bucket.slots, tensors):
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise ValueError(f"{slot.name}: expected {slot.shape} {slot.dtype}, got {tuple(tensor.shape)} "
                             f"{tensor.dtype}")
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[slot.offset : slot.offset + slot.nbytes].copy_(raw)
    return buffer


def unpack_bucket(bucket: Bucket, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every slot: views into `buffer` (no copy), so keep the buffer alive while they are used."""
    if buffer.dtype != torch.uint8 or buffer.numel() != bucket.nbytes:
        raise ValueError(f"expected a uint8 buffer of {bucket.nbytes} bytes, got {buffer.numel()} {buffer.dtype}")
    return [(slot.name, buffer[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape))
            for slot in bucket.slots]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _aligned(offset: int) -> int:
    return ceil_div(offset, ALIGN_BYTES) * ALIGN_BYTES
