"""Our backend for vLLM's weight-transfer API, built through vLLM's factory as a worker builds it, on CPU without an
engine: a learner thread sends, the backend receives into a model stand-in. (Through a real vLLM engine:
tests/policy/test_weight_sync.py.)"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config.weight_transfer import WeightTransferConfig  # noqa: E402
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory  # noqa: E402

from policy.vllm_weight_transfer import BACKEND, init_info, register  # noqa: E402
from policy.weight_buckets import plan_buckets  # noqa: E402
from policy.weight_sync import SyncGroup, SyncSpec, WeightSyncTimeout, host_store  # noqa: E402

CPU = torch.device("cpu")


class LoadingModel(torch.nn.Module):
    """Records what load_weights got, as a vLLM model's load_weights would consume it."""

    def __init__(self):
        super().__init__()
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights):
        self.loaded += [(name, tensor.clone()) for name, tensor in weights]
        return {name for name, _ in self.loaded}


def build_backend(model: torch.nn.Module):
    register()
    register()  # a second engine in the same process registers again: harmless
    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(rank=0), model_config=None)
    return WeightTransferEngineFactory.create_engine(WeightTransferConfig(backend=BACKEND), vllm_config, CPU, model)


def test_the_backend_receives_every_sync_over_one_group_and_releases_it():
    named = [("a.weight", torch.randn(40, 40)), ("b.bias", torch.randn(7).to(torch.bfloat16))]
    store = host_store("127.0.0.1")
    spec = SyncSpec("127.0.0.1", store.port, "g1", ("learner rank 0", "rollout engine 0"), 30.0)
    plan = plan_buckets([(name, t.shape, t.dtype) for name, t in named], bucket_bytes=4096)
    errors = []

    def learner():
        group = SyncGroup(spec, 0, CPU, store)
        try:
            for sync in range(2):
                group.send(sync, plan, ([dict(named)[slot.name] for slot in bucket.slots] for bucket in plan))
        except Exception as error:  # noqa: BLE001 - re-raised below
            errors.append(error)
        finally:
            group.shutdown()

    model = LoadingModel()
    backend = build_backend(model)
    thread = threading.Thread(target=learner)
    thread.start()
    backend.init_transfer_engine(backend.parse_init_info(init_info(spec, first_rank=1)))
    for sync in range(2):
        backend.update_weights({"sync": sync})  # the dict collective_rpc hands the worker's update_weights
    thread.join(timeout=60)
    assert errors == []
    assert [name for name, _ in model.loaded] == ["a.weight", "b.bias"] * 2
    for (_, got), (_, sent) in zip(model.loaded, named * 2):
        assert got.dtype == sent.dtype and torch.equal(got, sent)
    group = backend.group
    backend.shutdown()
    assert backend.group is None
    with pytest.raises(RuntimeError, match="was shut down"):
        next(group.receive(2))


def test_a_missing_learner_is_one_line_from_init_weight_transfer_engine():
    store = host_store("127.0.0.1")
    spec = SyncSpec("127.0.0.1", store.port, "g2", ("learner rank 0", "rollout engine 0"), 1.0)
    backend = build_backend(LoadingModel())
    with pytest.raises(WeightSyncTimeout) as error:
        backend.init_transfer_engine(backend.parse_init_info(init_info(spec, first_rank=1)))
    assert "rank 0 (learner rank 0) did not arrive within 1 s" in str(error.value)
    assert "\n" not in str(error.value)


def test_update_before_init_says_what_to_call():
    backend = build_backend(LoadingModel())
    with pytest.raises(RuntimeError, match="call init_weight_transfer_engine first"):
        backend.update_weights({"sync": 0})
