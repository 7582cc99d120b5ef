"""What the learner's policy hands to the rollout engines: one `WeightSource` per HF-named weight.

Under LoRA the engines get merged weights, W + (alpha / r) B A, under the base model's names; under ZeRO-3 each rank
holds a slice of every parameter, so a source names the parameters to gather before its value can be read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightSource:
    name: str  # the HF checkpoint name (what vLLM's load_weights and HF's load_state_dict take)
    shape: tuple[int, ...]  # the full shape, also while ZeRO-3 keeps the parameter partitioned
    dtype: torch.dtype
    params: tuple[torch.nn.Parameter, ...]  # to gather (ZeRO-3) before calling value
    value: Callable[[], torch.Tensor]  # the full weight, on the learner's device; valid while params are gathered


def weight_sources(module: torch.nn.Module, lora: bool) -> list[WeightSource]:
    """Every weight of the policy in `named_parameters` order (a peft model's adapters merged in when `lora`)."""
    if not lora:
        return [_source(name, param, (param,), param.detach) for name, param in module.named_parameters()]
    from peft.tuners.lora import LoraLayer

    base = module.get_base_model()
    adapted = {f"{name}.weight": layer for name, layer in base.named_modules() if isinstance(layer, LoraLayer)}
    sources = []
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        layer = adapted.get(name)
        if layer is None:
            sources.append(_source(name, param, (param,), param.detach))
        else:
            sources.append(_source(name, param, tuple(layer.parameters()), _merged(param, layer)))
    return sources


def _merged(param: torch.nn.Parameter, layer) -> Callable[[], torch.Tensor]:
    """W + the adapters' delta, computed beside W (merging in place and back would not restore it bit for bit)."""
    return lambda: param.detach() + sum(layer.get_delta_weight(adapter) for adapter in layer.active_adapters)


def _source(name: str, param: torch.nn.Parameter, params: tuple, value: Callable[[], torch.Tensor]) -> WeightSource:
    shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape in ds_shape
    return WeightSource(name, shape, param.dtype, params, value)
