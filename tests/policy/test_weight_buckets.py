"""Bucketing for the collective weight sync: boundaries, oversized tensors, mixed dtypes, a lossless round trip."""

from __future__ import annotations

import pytest
import torch

from policy.weight_buckets import ALIGN_BYTES, pack_bucket, plan_buckets, unpack_bucket


def names(plan) -> list[list[str]]:
    return [[slot.name for slot in bucket.slots] for bucket in plan]


def test_tensors_fill_a_bucket_up_to_its_size_and_no_further():
    fp32 = torch.float32
    # 64 floats = 256 bytes each; aligned offsets 0, 256, 512: three fit exactly in 768 bytes, the fourth does not
    plan = plan_buckets([(f"t{i}", (64,), fp32) for i in range(4)], bucket_bytes=768)
    assert names(plan) == [["t0", "t1", "t2"], ["t3"]]
    assert [bucket.nbytes for bucket in plan] == [768, 256]


def test_a_tensor_larger_than_the_bucket_travels_alone():
    fp32 = torch.float32
    plan = plan_buckets([("small", (4,), fp32), ("big", (1000,), fp32), ("after", (4,), fp32)], bucket_bytes=512)
    assert names(plan) == [["small"], ["big"], ["after"]]
    assert plan[1].nbytes == 4000


def test_mixed_dtypes_start_aligned_and_round_trip_bit_for_bit():
    tensors = [("a", torch.randn(3, dtype=torch.float32)), ("b", torch.randn(5).to(torch.bfloat16)),
               ("c", torch.arange(3, dtype=torch.int64)), ("d", torch.randn(2, 2, dtype=torch.float64))]
    plan = plan_buckets([(name, t.shape, t.dtype) for name, t in tensors], bucket_bytes=1 << 20)
    assert len(plan) == 1
    assert all(slot.offset % ALIGN_BYTES == 0 for slot in plan[0].slots)
    buffer = pack_bucket(plan[0], [t for _, t in tensors])
    assert buffer.dtype == torch.uint8 and buffer.numel() == plan[0].nbytes
    for (name, got), (expected_name, expected) in zip(unpack_bucket(plan[0], buffer), tensors):
        assert name == expected_name and got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)


def test_unflatten_gives_views_of_the_buffer_not_copies():
    plan = plan_buckets([("a", (2,), torch.float32)], bucket_bytes=64)
    buffer = pack_bucket(plan[0], [torch.tensor([1.0, 2.0])])
    (_, view), = unpack_bucket(plan[0], buffer)
    buffer.zero_()
    assert torch.equal(view, torch.zeros(2))


def test_flatten_refuses_a_tensor_that_is_not_the_planned_one():
    plan = plan_buckets([("a", (2,), torch.float32)], bucket_bytes=64)
    with pytest.raises(ValueError, match="a: expected"):
        pack_bucket(plan[0], [torch.zeros(2, dtype=torch.float64)])


def test_an_empty_model_is_no_bucket_and_a_bucket_size_must_be_positive():
    assert plan_buckets([], bucket_bytes=64) == []
    with pytest.raises(ValueError, match="positive"):
        plan_buckets([("a", (1,), torch.float32)], bucket_bytes=0)
