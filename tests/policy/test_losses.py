"""The preference losses against plain-Python math, and the whole log-prob + loss pipeline against TRL (DPOTrainer;
CPOTrainer for SimPO)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from policy.batching import response_log_probs
from rlhf_loop.common.sequences import pad_pairs
from policy.losses import LOSSES, LossSettings


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
                               LossSettings(beta, label_smoothing))
    for loss, c, r in zip(losses.tolist(), chosen, rejected):
        h = c - r
        expected = -(1 - label_smoothing) * log_sigmoid(beta * h) - label_smoothing * log_sigmoid(-beta * h)
        assert loss == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_ipo_matches_its_formula(beta):
    chosen, rejected = random_log_ratios(16, seed=2)
    losses = LOSSES["ipo"](torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64),
                           LossSettings(beta))
    for loss, c, r in zip(losses.tolist(), chosen, rejected):
        assert loss == pytest.approx((c - r - 1 / (2 * beta)) ** 2, rel=1e-12)


def test_sigmoid_loss_is_log2_when_policy_equals_reference_and_falls_as_margin_grows():
    zero = torch.zeros(1)
    assert LOSSES["sigmoid"](zero, zero, LossSettings(0.1)).item() == pytest.approx(math.log(2))
    margins = torch.tensor([-5.0, 0.0, 5.0, 50.0])
    losses = LOSSES["sigmoid"](margins, torch.zeros(4), LossSettings(0.1))
    assert torch.all(losses[1:] < losses[:-1])


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def expected_gradient(loss_type: str, pc, pr, rc, rr, lc, lr, s: LossSettings) -> float:
    """d loss / d (the chosen response's summed log pi), by hand from each loss's formula."""
    if loss_type in ("sigmoid", "rpo", "sigmoid_norm"):  # -(1-e) log s(h) - e log s(-h), h = beta x margin
        per_token = loss_type == "sigmoid_norm"
        h = s.beta * ((pc - rc) / lc - (pr - rr) / lr if per_token else (pc - rc) - (pr - rr))
        d_h = -(1 - s.label_smoothing) * sigmoid(-h) + s.label_smoothing * sigmoid(h)
        return s.beta * d_h / (lc if per_token else 1) - (s.rpo_alpha / lc if loss_type == "rpo" else 0.0)
    if loss_type == "ipo":  # (h - 1 / (2 beta))^2 on mean log-ratios
        return 2 * ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * s.beta)) / lc
    if loss_type == "hinge":  # relu(1 - beta h): -beta while the margin is short, 0 after
        return -s.beta if 1 - s.beta * ((pc - rc) - (pr - rr)) > 0 else 0.0
    if loss_type == "simpo":  # -log s(h), h = beta (mean log pi chosen - mean log pi rejected) - gamma
        h = s.beta * (pc / lc - pr / lr) - s.simpo_gamma
        d_h = -(1 - s.label_smoothing) * sigmoid(-h) + s.label_smoothing * sigmoid(h)
        return s.beta * d_h / lc
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_each_loss_s_gradient_matches_a_hand_computation(loss_type):
    """The gradient the learner steps along, on a small case: whether log-probs are summed or averaged, a
    reference used or not, an NLL term added, all show in it."""
    settings = LossSettings(beta=0.4, label_smoothing=0.1 if LOSSES[loss_type].label_smoothing else 0.0,
                            simpo_gamma=0.5, rpo_alpha=0.3)
    policy, reference, lengths = random_sequences(6, seed=5)
    policy = policy.clone().requires_grad_(True)
    losses, _, _ = LOSSES[loss_type].pair_losses(policy, reference, lengths, settings)
    losses.sum().backward()
    pc, pr = policy.detach().chunk(2)
    rc, rr = reference.chunk(2)
    lc, lr = lengths.chunk(2)
    chosen_gradient = policy.grad.chunk(2)[0]
    for i in range(6):
        args = (pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), lc[i].item(), lr[i].item())
        assert chosen_gradient[i].item() == pytest.approx(expected_gradient(loss_type, *args, settings),
                                                          rel=1e-9, abs=1e-12)
    if loss_type == "hinge":
        assert {g == 0 for g in chosen_gradient.tolist()} == {True, False}  # both sides of the hinge are seen


def random_sequences(pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed log-probs of policy and reference and token counts, chosen responses first (as the learner has them)."""
    rng = random.Random(seed)
    lengths = torch.tensor([rng.randint(1, 40) for _ in range(2 * pairs)], dtype=torch.float64)
    policy = torch.tensor([-rng.uniform(0.1, 3.0) * n for n in lengths.tolist()], dtype=torch.float64)
    reference = torch.tensor([-rng.uniform(0.1, 3.0) * n for n in lengths.tolist()], dtype=torch.float64)
    return policy, reference, lengths


def expected_loss(loss_type: str, pc, pr, rc, rr, lc, lr, s: LossSettings) -> float:
    """One pair's loss from the papers' formulas, in plain Python."""
    if loss_type == "sigmoid_norm":  # DPO on per-token log-ratios
        return -log_sigmoid(s.beta * ((pc - rc) / lc - (pr - rr) / lr))
    if loss_type == "hinge":  # SLiC-HF
        return max(0.0, 1 - s.beta * ((pc - rc) - (pr - rr)))
    if loss_type == "simpo":  # Meng et al. 2024, eq. 6: no reference
        return -log_sigmoid(s.beta * pc / lc - s.beta * pr / lr - s.simpo_gamma)
    if loss_type == "rpo":  # Pang et al. 2024: DPO + alpha x NLL(chosen) / |chosen|
        return -log_sigmoid(s.beta * ((pc - rc) - (pr - rr))) - s.rpo_alpha * pc / lc
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", ["sigmoid_norm", "hinge", "simpo", "rpo"])
@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_the_menu_losses_match_their_formulas(loss_type, beta):
    settings = LossSettings(beta, simpo_gamma=0.7, rpo_alpha=0.3)
    policy, reference, lengths = random_sequences(32, seed=3)
    loss = LOSSES[loss_type]
    losses, chosen_rewards, rejected_rewards = loss.pair_losses(
        policy, reference if loss.uses_reference else None, lengths, settings
    )
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    lc, lr = lengths.chunk(2)
    for i, value in enumerate(losses.tolist()):
        args = (pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), lc[i].item(), lr[i].item())
        assert value == pytest.approx(expected_loss(loss_type, *args, settings), rel=1e-12, abs=1e-12)
    if loss_type == "simpo":  # SimPO's implicit reward: beta x the mean log pi
        assert chosen_rewards.tolist() == pytest.approx((beta * pc / lc).tolist(), rel=1e-12)
    else:
        assert rejected_rewards.tolist() == pytest.approx((beta * (pr - rr)).tolist(), rel=1e-12)
    assert len({round(v, 6) for v in losses.tolist()}) > 16  # not a constant


def test_hinge_stops_pushing_once_the_margin_is_reached_and_simpo_needs_its_margin():
    settings = LossSettings(beta=0.5, simpo_gamma=1.0)
    assert LOSSES["hinge"](torch.tensor([2.0, 3.0]), torch.zeros(2), settings).tolist() == [0.0, 0.0]
    assert LOSSES["hinge"](torch.tensor([1.0]), torch.zeros(1), settings).item() == pytest.approx(0.5)
    # SimPO's gamma: a reward gap of exactly gamma costs what a zero gap costs plain DPO
    assert LOSSES["simpo"](torch.tensor([2.0]), torch.zeros(1), settings).item() == pytest.approx(math.log(2))


def test_only_simpo_ignores_the_reference_and_only_rpo_adds_an_nll_term():
    """Behaviour, not flags: a different reference changes every loss but SimPO's; raising the chosen response's
    log pi and log ref alike (its log-ratio unchanged) changes only RPO's, by - alpha x the raise / |chosen|."""
    settings = LossSettings(beta=0.4, simpo_gamma=0.5, rpo_alpha=0.3)
    policy, reference, lengths = random_sequences(6, seed=6)
    chosen_only = torch.cat([torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)])
    raise_chosen = 2.5 * chosen_only
    ignores_reference, adds_nll = [], []
    for name, loss in LOSSES.items():
        base, _, _ = loss.pair_losses(policy, reference, lengths, settings)
        other_reference, _, _ = loss.pair_losses(policy, reference - 3.0 * chosen_only, lengths, settings)
        if torch.allclose(base, other_reference):
            ignores_reference.append(name)
        raised, _, _ = loss.pair_losses(policy + raise_chosen, reference + raise_chosen, lengths, settings)
        if name != "simpo" and not torch.allclose(base, raised):
            adds_nll.append(name)
            assert (raised - base).tolist() == pytest.approx((-0.3 * 2.5 / lengths.chunk(2)[0]).tolist(), rel=1e-9)
        assert loss.uses_reference == (name not in ignores_reference)  # the flag the learner loads a reference by
    assert ignores_reference == ["simpo"]
    assert adds_nll == ["rpo"]
    assert {"sigmoid", "ipo", "sigmoid_norm", "hinge", "simpo", "rpo"} <= set(LOSSES)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "sigmoid_norm"])
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

    policy_log_probs, reference_log_probs, lengths = pair_log_probs(tokenized, policy, reference, tiny_tokenizer)
    log_ratios = policy_log_probs - reference_log_probs
    if LOSSES[loss_type].average_log_probs:
        log_ratios = log_ratios / lengths
    chosen, rejected = log_ratios.chunk(2)
    ours = LOSSES[loss_type](chosen, rejected, LossSettings(beta)).mean().item()
    assert ours == pytest.approx(trl_loss, rel=1e-4)
    at_zero = LOSSES[loss_type](torch.zeros(1), torch.zeros(1), LossSettings(beta)).item()
    assert abs(ours - at_zero) > 1e-3  # not trivial


def test_rpo_matches_trl_dpo_with_an_sft_term(tiny_tokenizer, tiny_policy_dir, tmp_path):
    """TRL's RPO is loss_type [sigmoid, sft] weighted [1, alpha]. Its sft term is the mean NLL over all chosen tokens
    of a batch; ours is per pair (NLL / |chosen|, as in the RPO paper): the two agree batch by batch for one-pair
    batches, so TRL computes each pair on its own and the mean is compared."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from rlhf_loop.toy.tiny import build_tiny_policy

    reference_dir = build_tiny_policy(tiny_tokenizer, tmp_path / "reference", seed=7)
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    rows = [{"prompt": f"Count to {n}:", "chosen": " one two" * n, "rejected": " blue green" if n % 2 else " dog"}
            for n in range(1, 5)]
    beta, alpha = 0.3, 0.7
    trainer = DPOTrainer(
        model=policy, ref_model=reference,
        args=DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=["sigmoid", "sft"],
                       loss_weights=[1.0, alpha], report_to=[], use_cpu=True, per_device_train_batch_size=1),
        train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer,
    )
    tokenized = [trainer.train_dataset[i] for i in range(len(rows))]
    with torch.no_grad():
        trl_losses = [trainer.compute_loss(trainer.model, trainer.data_collator([row])).item() for row in tokenized]

    policy_log_probs, reference_log_probs, lengths = pair_log_probs(tokenized, policy, reference, tiny_tokenizer)
    losses, _, _ = LOSSES["rpo"].pair_losses(policy_log_probs, reference_log_probs, lengths,
                                             LossSettings(beta, rpo_alpha=alpha))
    assert losses.tolist() == pytest.approx(trl_losses, rel=1e-4)
    dpo_only, _, _ = LOSSES["sigmoid"].pair_losses(policy_log_probs, reference_log_probs, lengths, LossSettings(beta))
    assert (losses - dpo_only).min().item() > 1e-2  # the NLL term is really there


def test_simpo_matches_trl_cpo_trainer(tiny_tokenizer, tiny_policy_dir, tmp_path):
    """TRL has SimPO in (experimental) CPOTrainer: loss_type simpo, cpo_alpha 0 (no NLL term), no reference model."""
    import warnings

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" warnings
        from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    rows = [{"prompt": f"Count to {n}:", "chosen": " one two" * n, "rejected": " blue green" if n % 2 else " dog"}
            for n in range(1, 5)]
    beta, gamma = 2.0, 0.8
    trainer = CPOTrainer(
        model=policy,
        args=CPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type="simpo", simpo_gamma=gamma,
                       cpo_alpha=0.0, report_to=[], use_cpu=True, per_device_train_batch_size=len(rows)),
        train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer,
    )
    tokenized = [trainer.train_dataset[i] for i in range(len(rows))]
    with torch.no_grad():
        trl_loss, _ = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(tokenized))

    def split(row, kind):  # CPO marks the prompt part of each sequence with label -100
        prompt_length = sum(label == -100 for label in row[f"{kind}_labels"])
        ids = row[f"{kind}_input_ids"]
        return ids[:prompt_length], ids[prompt_length:]

    sequences = [split(row, "chosen") for row in tokenized] + [split(row, "rejected") for row in tokenized]
    batch = pad_pairs(sequences, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        policy_log_probs, lengths = response_log_probs(policy, batch)
    losses, _, _ = LOSSES["simpo"].pair_losses(policy_log_probs, None, lengths, LossSettings(beta, simpo_gamma=gamma))
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-4)
    assert abs(losses.mean().item() - math.log(1 + math.exp(gamma))) > 1e-2  # not the value at a zero gap


def pair_log_probs(tokenized: list[dict], policy, reference, tokenizer):
    """Summed response log-probs of TRL's tokenized rows under policy and reference: chosen rows first, then
    rejected; and the response lengths."""
    sequences = [(row["prompt_ids"], row["chosen_ids"]) for row in tokenized]
    sequences += [(row["prompt_ids"], row["rejected_ids"]) for row in tokenized]
    batch = pad_pairs(sequences, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        policy_log_probs, lengths = response_log_probs(policy, batch)
        reference_log_probs, _ = response_log_probs(reference, batch)
    return policy_log_probs, reference_log_probs, lengths
