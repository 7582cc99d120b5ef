"""Optimisation settings shared by the DPO and SFT learners, and the learning-rate schedule as a function of the step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from policy.config import SFTConfig, TrainConfig


@dataclass(frozen=True)
class OptimizationSpec:
    """What the shared engine needs to know about optimisation, whichever config section it comes from."""

    learning_rate: float
    lr_schedule: str  # constant | linear | cosine, after linear warmup
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int  # micro_batch_size x gradient_accumulation_steps x learner ranks
    zero_stage: int
    gradient_checkpointing: bool

    @classmethod
    def from_train(cls, train: TrainConfig) -> OptimizationSpec:
        return cls(
            learning_rate=train.learning_rate,
            lr_schedule=train.lr_schedule,
            warmup_ratio=train.warmup_ratio,
            weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm,
            micro_batch_size=train.micro_batch_size,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            global_batch_size=train.global_batch_size,
            zero_stage=train.zero_stage,
            gradient_checkpointing=train.gradient_checkpointing,
        )

    @classmethod
    def from_sft(cls, sft: SFTConfig) -> OptimizationSpec:
        """SFT runs on one worker, so ZeRO partitioning has nothing to split and accumulation nothing to add."""
        return cls(
            learning_rate=sft.learning_rate,
            lr_schedule=sft.lr_schedule,
            warmup_ratio=sft.warmup_ratio,
            weight_decay=sft.weight_decay,
            max_grad_norm=sft.max_grad_norm,
            micro_batch_size=sft.micro_batch_size,
            gradient_accumulation_steps=1,
            global_batch_size=sft.micro_batch_size,
            zero_stage=0,
            gradient_checkpointing=sft.gradient_checkpointing,
        )


def learning_rate_at(step: int, total_steps: int, spec: OptimizationSpec) -> float:
    """The learning rate of optimizer step `step` (0-based) of a run of `total_steps` steps.

    A pure function of the step, so resuming needs no scheduler state. Warmup ramps up to the peak over the first
    ceil(warmup_ratio * total_steps) steps (the first step already moves); the decay reaches 0 after the last step.

    Not `transformers.get_scheduler`: after warmup its linear, cosine and constant_with_warmup schedules give these
    same rates (tests/policy/test_optimization.py compares them), but its warmup starts at 0, so the first optimizer
    step would not move the weights (a wasted step in every short DPO iteration), and its scheduler is state that a
    checkpoint would have to carry, where this function of the step resumes exactly with nothing saved.
    """
    warmup_steps = math.ceil(spec.warmup_ratio * total_steps)
    if step < warmup_steps:
        return spec.learning_rate * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if spec.lr_schedule == "constant":
        return spec.learning_rate
    if spec.lr_schedule == "linear":
        return spec.learning_rate * (1.0 - progress)
    if spec.lr_schedule == "cosine":
        return spec.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule {spec.lr_schedule!r} is unknown; use constant, linear or cosine")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: decaying norms and biases toward 0 only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
