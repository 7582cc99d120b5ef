"""The preference losses against plain-Python math, and the whole log-prob + loss pipeline against TRL's DPOTrainer."""

from __future__ import annotations

import math
import random

import pytest
import torch

from policy.batching import pad_batch, response_log_probs
from policy.losses import LOSSES


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def random_log_ratios(count: int, seed: int) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    return [rng.uniform(-30, 30) for _ in range(count)], [rng.uniform(-30, 30) for _ in range(count)]


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_sigmoid_matches_dpo_and_cdpo_formulas(beta, label_smoothing):
    chosen, rejected = random_log_ratios(16, seed=1)
    losses = LOSSES["sigmoid"](torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64),
                               beta, label_smoothing)
    for loss, c, r in zip(losses.tolist(), chosen, rejected):
        h = c - r
        expected = -(1 - label_smoothing) * log_sigmoid(beta * h) - label_smoothing * log_sigmoid(-beta * h)
        assert loss == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_ipo_matches_its_formula(beta):
    chosen, rejected = random_log_ratios(16, seed=2)
    losses = LOSSES["ipo"](torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64),
                           beta, 0.0)
    for loss, c, r in zip(losses.tolist(), chosen, rejected):
        assert loss == pytest.approx((c - r - 1 / (2 * beta)) ** 2, rel=1e-12)


def test_sigmoid_loss_is_log2_when_policy_equals_reference_and_falls_as_margin_grows():
    zero = torch.zeros(1)
    assert LOSSES["sigmoid"](zero, zero, 0.1, 0.0).item() == pytest.approx(math.log(2))
    margins = torch.tensor([-5.0, 0.0, 5.0, 50.0])
    losses = LOSSES["sigmoid"](margins, torch.zeros(4), 0.1, 0.0)
    assert torch.all(losses[1:] < losses[:-1])


def test_each_loss_declares_its_log_prob_kind():
    assert LOSSES["sigmoid"].average_log_probs is False
    assert LOSSES["ipo"].average_log_probs is True


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_log_probs_and_loss_match_trl(loss_type, tiny_tokenizer, tiny_policy_dir, tmp_path):
    """TRL 1.16 computes its loss inline in DPOTrainer._compute_loss, so the trainer itself is the reference: the same
    models, the same token ids (taken from TRL's tokenised dataset), its loss against ours."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from rlhf_loop.toy.tiny import build_tiny_policy

    reference_dir = build_tiny_policy(tiny_tokenizer, tmp_path / "reference", seed=7)  # differs from the policy
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    rows = [
        {"prompt": f"Count to {n}:", "chosen": " one two" * n, "rejected": " blue green" if n % 2 else " dog"}
        for n in range(1, 5)
    ]
    beta = 0.3
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to=[],
                       use_cpu=True, per_device_train_batch_size=len(rows)),
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer,
    )
    tokenized = [trainer.train_dataset[i] for i in range(len(rows))]
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(tokenized)).item()

    sequences = [(row["prompt_ids"], row["chosen_ids"]) for row in tokenized]
    sequences += [(row["prompt_ids"], row["rejected_ids"]) for row in tokenized]
    batch = pad_batch(sequences, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        policy_log_probs, lengths = response_log_probs(policy, batch)
        reference_log_probs, _ = response_log_probs(reference, batch)
    log_ratios = policy_log_probs - reference_log_probs
    if LOSSES[loss_type].average_log_probs:
        log_ratios = log_ratios / lengths
    chosen, rejected = log_ratios.chunk(2)
    ours = LOSSES[loss_type](chosen, rejected, beta, 0.0).mean().item()
    assert ours == pytest.approx(trl_loss, rel=1e-4)
    assert abs(ours - LOSSES[loss_type](torch.zeros(1), torch.zeros(1), beta, 0.0).item()) > 1e-3  # not trivial
