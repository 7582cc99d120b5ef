"""scripts/kl_breakdown.py: its summary's arithmetic, and the log-ratios it reads from a run directory built by hand
against ones computed here token by token."""

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("kl_breakdown", REPO / "scripts" / "kl_breakdown.py")
kl_breakdown = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = kl_breakdown  # dataclasses look their module up there
_spec.loader.exec_module(kl_breakdown)

Sample = kl_breakdown.Sample


def test_the_summary_gives_the_mean_its_standard_error_the_tail_and_the_turns():
    samples = [Sample(1.0, 1, 5), Sample(1.0, 1, 5), Sample(2.0, 3, 20), Sample(4.0, 3, 22)] + \
        [Sample(0.0, 1, 5)] * 6
    text = kl_breakdown.summary(samples, top=2)
    ratios = [s.log_ratio for s in samples]
    stderr = math.sqrt(sum((r - 0.8) ** 2 for r in ratios) / 9) / math.sqrt(10)
    assert f"KL estimate 0.800 +- {stderr:.3f} (standard error) over 10 samples" in text
    assert "min 0.00, median 0.00, 90% 4.00, 99% 4.00, max 4.00" in text
    assert "the top tenth of samples carries 0.50 of the sum" in text  # 4 of 8
    assert "| 1 | 0.80 | 0.25 | 5.0 |" in text and "| 3 | 0.20 | 3.00 | 21.0 |" in text
    assert "the 2 largest log-ratios: 4.0 (3 turns), 2.0 (3 turns)" in text
    single_turn = kl_breakdown.summary([Sample(0.5, None, 3), Sample(-0.5, None, 3)], top=1)
    assert "| turns |" not in single_turn and "the sum is not positive" in single_turn


def _log_prob(model, prompt, response, mask):
    """Summed log-probability of the masked response tokens, one position at a time."""
    total = 0.0
    with torch.no_grad():
        for position, (token, counts) in enumerate(zip(response, mask)):
            logits = model(torch.tensor([prompt + response[:position]])).logits[0, -1]
            if counts:
                total += torch.log_softmax(logits.double(), -1)[token].item()
    return total


def test_the_log_ratios_are_the_sampler_s_against_pi_0_over_the_policy_s_tokens(tmp_path, tiny_policy_dir):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    pi_0 = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    moved = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    moved.save_pretrained(run / "iter_001" / "policy")
    (run / "config.yaml").write_text(f"policy:\n  model_path: {tiny_policy_dir}\nreward:\n  model_path: rm\n"
                                     "data:\n  prompts: [prompts.jsonl]\n")
    prompt = [5, 6, 7, 8]
    episode = {"turns": 2, "loss_mask": [1, 1, 0, 0, 1]}
    rollout = {"prompt": {"token_ids": prompt},
               "responses": [{"token_ids": [9, 10, 11, 12, 13], "episode": episode},
                             {"token_ids": [20, 21, 22], "episode": None}]}
    (run / "iter_002" / "rollouts").mkdir(parents=True)
    (run / "iter_002" / "rollouts" / "shard_00000.jsonl").write_text(json.dumps(rollout) + "\n")

    samples = kl_breakdown.log_ratios(run, 2)
    expected = [_log_prob(moved, prompt, r, m) - _log_prob(pi_0, prompt, r, m)
                for r, m in (([9, 10, 11, 12, 13], episode["loss_mask"]), ([20, 21, 22], [1, 1, 1]))]
    assert [s.log_ratio for s in samples] == pytest.approx(expected, abs=1e-4)
    assert abs(expected[0]) > 1e-3  # the policy did move
    assert [(s.turns, s.policy_tokens) for s in samples] == [(2, 3), (None, 3)]

    shutil.copytree(tiny_policy_dir, run / "iter_001" / "policy", dirs_exist_ok=True)  # the sampler is pi_0 itself
    assert [s.log_ratio for s in kl_breakdown.log_ratios(run, 2)] == [0.0, 0.0]
    with pytest.raises(SystemExit, match="--iteration must be >= 2"):
        kl_breakdown.log_ratios(run, 1)
