"""The learning-rate schedule against transformers' own: the same decay, a warmup whose first step already moves."""

from __future__ import annotations

import pytest
import torch

from policy.config import TrainConfig
from policy.optimization import OptimizationSpec, learning_rate_at

HF_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@pytest.mark.parametrize("schedule", sorted(HF_NAMES))
def test_after_warmup_the_rates_are_transformers_and_warmup_starts_one_step_ahead(schedule):
    from transformers import get_scheduler

    total, warmup = 10, 2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_scheduler(HF_NAMES[schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total)
    theirs = [hf.lr_lambdas[0](step) for step in range(total)]
    spec = OptimizationSpec.from_train(TrainConfig(learning_rate=1.0, lr_schedule=schedule, warmup_ratio=0.2))
    ours = [learning_rate_at(step, total, spec) for step in range(total)]
    assert ours[warmup:] == pytest.approx(theirs[warmup:])
    assert theirs[0] == 0.0 and ours[:warmup] == pytest.approx(theirs[1:warmup + 1])
