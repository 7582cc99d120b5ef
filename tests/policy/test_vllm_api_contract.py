"""The installed vLLM's API surface that the rollout engine and its weight transfer rely on, checked by signature.

The GPU path cannot run here; these checks make a vLLM upgrade that renames or reshapes one of these calls fail in
the suite instead of on the first GPU run. They import vLLM but start no engine.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

vllm = pytest.importorskip("vllm")

from vllm import LLM  # noqa: E402
from vllm.distributed.weight_transfer.base import WeightTransferEngine  # noqa: E402
from vllm.distributed.weight_transfer.factory import (  # noqa: E402
    WeightTransferEngineFactory,
    WeightTransferTrainerFactory,
)
from vllm.engine.arg_utils import EngineArgs  # noqa: E402


def parameters(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


def test_the_factory_registers_custom_engines_and_ships_nccl_and_ipc():
    assert parameters(WeightTransferEngineFactory.register_engine)[:2] == ["name", "module_path_or_cls"]
    assert parameters(WeightTransferEngineFactory.create_engine) == ["config", "vllm_config", "device", "model"]
    for registry in (WeightTransferEngineFactory._registry, WeightTransferTrainerFactory._registry):
        assert {"nccl", "ipc"} <= set(registry)
    # a second registration under one name is refused: ours registers once per process (policy.vllm_weight_transfer)
    with pytest.raises(ValueError, match="already registered"):
        WeightTransferEngineFactory.register_engine("nccl", WeightTransferEngine)


def test_the_engine_base_class_has_the_lifecycle_our_backend_implements():
    abstract = set(WeightTransferEngine.__abstractmethods__)
    assert abstract == {"init_transfer_engine", "start_weight_update", "finish_weight_update", "receive_weights",
                        "shutdown"}
    assert parameters(WeightTransferEngine.__init__) == ["config", "vllm_config", "device", "model"]
    assert parameters(WeightTransferEngine.update_weights) == ["update_info"]
    assert parameters(WeightTransferEngine.parse_init_info) == ["init_dict"]
    # The base update_weights synchronises the accelerator, which raises on a machine without one: our backend
    # overrides update_weights for CPU (docs/gpu.md). If vLLM drops that call, the override can go.
    assert "torch.accelerator.synchronize" in inspect.getsource(WeightTransferEngine.update_weights)


def test_the_worker_methods_collective_rpc_reaches_exist_on_the_cpu_worker_too():
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    assert issubclass(CPUWorker, Worker)
    expected = {"init_weight_transfer_engine": ["init_info"], "start_weight_update": [],
                "update_weights": ["update_info"], "finish_weight_update": [], "shutdown_weight_transfer_engine": []}
    for name, arguments in expected.items():
        assert parameters(getattr(CPUWorker, name)) == arguments, name
        assert getattr(CPUWorker, name) is getattr(Worker, name), f"CPUWorker overrides {name}"
    # the engine is built in load_model from vllm_config.weight_transfer_config, which CPUWorker inherits
    assert "load_model" not in CPUWorker.__dict__
    assert "WeightTransferEngineFactory.create_engine" in inspect.getsource(Worker.load_model)


def test_the_engine_arguments_take_a_weight_transfer_config_with_any_registered_backend():
    from vllm.config.weight_transfer import WeightTransferConfig

    assert "weight_transfer_config" in {field.name for field in dataclasses.fields(EngineArgs)}
    assert WeightTransferConfig(backend="any_registered_name").backend == "any_registered_name"


def test_the_layerwise_reload_our_backend_runs_between_start_and_finish_exists():
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    assert parameters(initialize_layerwise_reload)[:1] == ["model"]
    # finalize is wrapped (torchao) and shows no signature: vLLM's own nccl backend calls it as we do
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    assert callable(finalize_layerwise_reload)
    assert "finalize_layerwise_reload(self.model, self.model_config)" in inspect.getsource(
        NCCLWeightTransferEngine.finish_weight_update)


def test_llm_sleep_wake_and_collective_rpc_take_what_the_engine_passes():
    assert "level" in parameters(LLM.sleep)
    assert "tags" in parameters(LLM.wake_up)  # the colocation schedule wakes "weights" before "kv_cache"
    signature = inspect.signature(LLM.collective_rpc)
    assert list(signature.parameters)[1:4] == ["method", "timeout", "args"]
    assert "Callable" in str(signature.parameters["method"].annotation)  # a function runs inside each worker


def test_the_nccl_trainer_side_takes_a_tcp_rendezvous():
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLWeightTransferInitInfo

    trainer_fields = {field.name for field in dataclasses.fields(NCCLTrainerInitInfo)}
    assert {"master_address", "master_port", "world_size", "rank"} <= trainer_fields
    assert NCCLTrainerInitInfo.backend == "nccl"
    assert "rank_offset" in {field.name for field in dataclasses.fields(NCCLWeightTransferInitInfo)}
