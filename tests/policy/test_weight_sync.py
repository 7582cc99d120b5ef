"""After a sync, every rollout engine samples from exactly the learner's policy: greedy outputs agree token for token.
The collective itself (policy.weight_sync) is also checked without Ray: ranks are threads of this process."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from policy.config import LoRAConfig, RolloutConfig, TrainConfig
from policy.weight_buckets import plan_buckets
from policy.weight_sync import SyncGroup, SyncSpec, WeightSyncAborted, WeightSyncTimeout, abort_sync, host_store
from rlhf_loop.common.records import Pair, Response
from rlhf_loop.driver.stages import sync_weights

CPU = torch.device("cpu")


def pairs_for(prompts, tokenizer) -> list[Pair]:
    def response(text: str) -> Response:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return Response(text=text, token_ids=ids, finish_reason="stop")

    return [Pair(prompt_index=p.index, prompt_messages=p.messages, prompt_token_ids=p.token_ids,
                 chosen=response("apples, bananas and cherries"), rejected=response("the lazy dog"),
                 chosen_score=1.0, rejected_score=0.0) for p in prompts]


@pytest.mark.integration  # starts Ray actors
@pytest.mark.parametrize(("engine", "lora", "weight_sync", "zero3_ranks", "dtype"), [
    ("vllm", False, "collective", 0, "auto"), ("hf", False, "collective", 0, "auto"),
    ("vllm", True, "collective", 0, "auto"), ("vllm", False, "object_store", 0, "auto"),
    ("hf", False, "collective", 2, "auto"),  # two ZeRO-3 ranks: each bucket is gathered from both before rank 0 sends
    # bf16 end to end (DeepSpeed's bf16 path, the merge in bf16, bf16 buckets): the HF engine runs the learner's
    # own forward code, so its greedy tokens must still match exactly
    ("hf", True, "collective", 0, "bfloat16"),
])
def test_every_engine_matches_the_learner_after_sync(engine, lora, weight_sync, zero3_ranks, dtype, ray_local,
                                                     policy_config, prompts, tiny_tokenizer):
    from dataclasses import replace

    from policy.learner_group import LearnerGroup

    policy_config = replace(policy_config, dtype=dtype)
    from policy.rollout_group import RolloutGroup

    layout = dict(num_workers=zero3_ranks, zero_stage=3, micro_batch_size=2) if zero3_ranks else {}
    train = TrainConfig(learning_rate=5e-2 if lora else 5e-3, **{"micro_batch_size": 4, **layout},
                        lora=LoRAConfig(enabled=lora))
    learner = LearnerGroup(policy_config, train, "cpu", seed=0)  # with LoRA the engines get the merged weights
    # 1 MB buckets: the tiny policy (about 0.6 MB of weights per layer) travels in several
    rollout_config = RolloutConfig(engine=engine, num_engines=2, weight_sync=weight_sync, weight_sync_bucket_mb=1)
    rollout = RolloutGroup(policy_config, rollout_config, "cpu", max_model_len=128, seed=0)
    try:
        fixed = prompts[:6]
        max_tokens = 16
        before = rollout.greedy(fixed, max_tokens)
        learner.begin_iteration(1, pairs_for(prompts, tiny_tokenizer), reference_dir=None)
        learner.train_steps(4)
        expected = learner.greedy_generate([p.token_ids for p in fixed], max_tokens)
        assert before[0] != expected, "training did not change the greedy outputs: the test could not fail"

        sync_weights(learner, rollout)

        after = rollout.greedy(fixed, max_tokens)
        assert len(after) == 2
        for engine_outputs in after:
            assert engine_outputs == expected
    finally:
        rollout.shutdown()
        learner.shutdown()


# ---- the collective without Ray: every rank a thread ------------------------------------------------------------

def run_sync(named: list[tuple[str, torch.Tensor]], bucket_bytes: int, receivers: int, timeout_s: float = 30.0,
             missing: int = 0, syncs: int = 1) -> tuple[list[Exception], dict[int, list[tuple[str, torch.Tensor]]]]:
    """Rank 0 sends `named` to ranks 1..receivers `syncs` times over one group; the last `missing` of them never
    come. Errors of every rank, and what each receiving rank got in the last sync (copied)."""
    store = host_store("127.0.0.1")
    names = ("learner rank 0",) + tuple(f"rollout engine {i}" for i in range(receivers))
    spec = SyncSpec("127.0.0.1", store.port, "test", names, timeout_s)
    plan = plan_buckets([(name, tensor.shape, tensor.dtype) for name, tensor in named], bucket_bytes)
    by_name = dict(named)
    errors: list[Exception] = []
    received: dict[int, list[tuple[str, torch.Tensor]]] = {}

    def rank(number: int) -> None:
        group = None
        try:
            group = SyncGroup(spec, number, CPU, store if number == 0 else None)
            for sync in range(syncs):
                if number == 0:
                    group.send(sync, plan, ([by_name[slot.name] for slot in bucket.slots] for bucket in plan))
                else:
                    received[number] = [(name, tensor.clone()) for name, tensor in group.receive(sync)]
        except Exception as error:  # noqa: BLE001 - every rank's error is the result here
            errors.append(error)
        finally:
            if group is not None:
                group.shutdown()

    threads = [threading.Thread(target=rank, args=(number,)) for number in range(receivers + 1 - missing)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s + 30)
    return errors, received


def test_two_receivers_get_every_tensor_bit_for_bit_across_dtypes():
    generator = torch.Generator().manual_seed(0)
    named = [
        ("embed.weight", torch.randn(64, 32, generator=generator)),  # 8 KiB: more than the 4 KiB bucket, alone
        ("norm.weight", torch.randn(32, generator=generator).to(torch.bfloat16)),
        ("scale", torch.tensor(3.5, dtype=torch.float64)),  # a 0-d tensor
        ("count", torch.arange(7, dtype=torch.int64)),
        ("proj.weight", torch.randn(16, 16, generator=generator).to(torch.float16)),
        ("nan_and_neg_zero", torch.tensor([float("nan"), -0.0, float("inf")])),
    ]
    errors, received = run_sync(named, bucket_bytes=4096, receivers=2, syncs=3)  # one group, three syncs
    assert errors == []
    for rank in (1, 2):
        assert [name for name, _ in received[rank]] == [name for name, _ in named]
        for (_, got), (_, sent) in zip(received[rank], named):
            assert got.dtype == sent.dtype and got.shape == sent.shape
            assert torch.equal(got.view(torch.uint8) if got.dim() else got.reshape(1).view(torch.uint8),
                               sent.view(torch.uint8) if sent.dim() else sent.reshape(1).view(torch.uint8))


def test_a_missing_rank_is_named_in_one_line_on_every_rank_that_came():
    named = [("w", torch.ones(4))]
    start = time.monotonic()
    errors, _ = run_sync(named, bucket_bytes=1024, receivers=2, timeout_s=1.0, missing=1)
    assert time.monotonic() - start < 20
    assert len(errors) == 2  # the learner and rollout engine 0 both say who is missing
    for error in errors:
        assert isinstance(error, WeightSyncTimeout)
        message = str(error)
        assert "\n" not in message
        assert "rank 2 (rollout engine 1) did not arrive within 1 s" in message
        assert "rollout.weight_sync_timeout_s" in message


def test_an_unreachable_learner_store_is_one_line_naming_the_receiver():
    from rlhf_loop.common.network import free_port

    spec = SyncSpec("127.0.0.1", free_port(), "test", ("learner rank 0", "rollout engine 0"), timeout_s=1.0)
    with pytest.raises(WeightSyncTimeout, match="rollout engine 0 could not reach learner rank 0's store") as error:
        SyncGroup(spec, 1, CPU)
    assert "\n" not in str(error.value)


def test_a_shut_down_group_refuses_to_send():
    store = host_store("127.0.0.1")
    group = SyncGroup(SyncSpec("127.0.0.1", store.port, "alone", ("learner rank 0",), 5.0), 0, CPU, store)
    group.shutdown()
    group.shutdown()  # twice is harmless: the learner and its policy may both release it
    with pytest.raises(RuntimeError, match="weight sync group alone was shut down"):
        group.send(0, [], [])


def test_a_sender_that_never_starts_the_sync_is_one_line_naming_it():
    store = host_store("127.0.0.1")
    spec = SyncSpec("127.0.0.1", store.port, "silent", ("learner rank 0", "rollout engine 0"), 1.0)
    groups = {}
    sender = threading.Thread(target=lambda: groups.setdefault(0, SyncGroup(spec, 0, CPU, store)))
    sender.start()
    receiver = SyncGroup(spec, 1, CPU)
    sender.join(timeout=30)
    try:
        with pytest.raises(WeightSyncTimeout, match="learner rank 0 did not start sync 0 within 1 s") as error:
            next(receiver.receive(0))
        assert "\n" not in str(error.value)
    finally:
        receiver.shutdown()
        groups[0].shutdown()


def test_the_drivers_abort_stops_ranks_waiting_for_one_that_will_never_come():
    store = host_store("127.0.0.1")
    spec = SyncSpec("127.0.0.1", store.port, "dead-engine", ("learner rank 0", "rollout engine 0", "rollout engine 1"),
                    timeout_s=300)
    errors = []

    def rank(number):
        try:
            SyncGroup(spec, number, CPU, store if number == 0 else None)
        except Exception as error:  # noqa: BLE001 - the result
            errors.append(error)

    threads = [threading.Thread(target=rank, args=(number,)) for number in (0, 1)]  # rank 2 never comes
    start = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    abort_sync(spec, "rollout engine 1 died")
    for thread in threads:
        thread.join(timeout=30)
    assert time.monotonic() - start < 15
    assert len(errors) == 2 and all(isinstance(error, WeightSyncAborted) for error in errors)
    assert {str(error) for error in errors} == {
        f"weight sync dead-engine: {name} stopped waiting: rollout engine 1 died"
        for name in ("learner rank 0", "rollout engine 0")}


def test_the_drivers_abort_stops_a_receiver_in_the_middle_of_a_broadcast():
    """The learner has published the plan but stalls before its first bucket (as when another receiver's death
    broke its broadcast): the receivers, already waiting on gloo for that bucket, stop at the abort."""
    store = host_store("127.0.0.1")
    spec = SyncSpec("127.0.0.1", store.port, "stalled", ("learner rank 0", "rollout engine 0"), timeout_s=20)
    named = [("w", torch.ones(8))]
    plan = plan_buckets([(name, tensor.shape, tensor.dtype) for name, tensor in named], 1024)
    go_on = threading.Event()
    groups, errors = {}, []

    def stalled_buckets():
        go_on.wait(timeout=60)
        yield [named[0][1]]

    def sender():
        groups[0] = SyncGroup(spec, 0, CPU, store)
        try:
            groups[0].send(0, plan, stalled_buckets())
        except WeightSyncTimeout:
            pass  # its receiver has gone
        finally:
            groups[0].shutdown()

    thread = threading.Thread(target=sender)
    thread.start()
    receiver = SyncGroup(spec, 1, CPU)
    try:
        received = receiver.receive(0)
        waiter = threading.Thread(target=lambda: errors.append(_first_error(received)))
        start = time.monotonic()
        waiter.start()
        time.sleep(0.5)
        abort_sync(spec, "rollout engine 1 died")
        waiter.join(timeout=30)
        assert time.monotonic() - start < 10  # the gloo timeout is 20 s
        assert len(errors) == 1 and isinstance(errors[0], WeightSyncAborted)
        assert "rollout engine 0 stopped waiting" in str(errors[0])
    finally:
        go_on.set()
        receiver.shutdown()
        thread.join(timeout=60)


def _first_error(received) -> Exception | None:
    try:
        next(received)
    except Exception as error:  # noqa: BLE001 - the result
        return error
    return None
