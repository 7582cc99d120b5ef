"""How well calibrated a build of the toy task's assets is: pi_0's gold reward on held-out prompts, and how often the
reward model ranks two of pi_0's own samples as the gold rule does.

The README's numbers assume both hold on every machine: pi_0 good enough to be on-task but far from perfect (its gold
in `PI_0_GOLD_BAND`) and a reward model that ranks pi_0's samples right at least `MIN_REWARD_ACCURACY` of the time.
The long_lists variant has a band of its own (`BANDS`): pi_0 further from the answers, and its best of K by gold at
most half of a perfect answer's, so that what DPO has to reach is not already among pi_0's samples.
The build measures them and writes them into build.json; `scripts/build_toy_assets.py` prints them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

MIN_REWARD_ACCURACY = 0.75


@dataclass(frozen=True)
class Band:
    """What a variant's build must measure (besides MIN_REWARD_ACCURACY)."""

    pi_0_gold: tuple[float, float]  # pi_0's mean gold, low and high
    max_best_of_k_gold: float = 1.0  # pi_0's best of K by gold at most this: the answers left for DPO to reach


BANDS = {"short_lists": Band(pi_0_gold=(0.45, 0.65)), "long_lists": Band(pi_0_gold=(0.1, 0.35), max_best_of_k_gold=0.5)}
PI_0_GOLD_BAND = BANDS["short_lists"].pi_0_gold


@dataclass(frozen=True)
class Calibration:
    initial_gold: float  # random-init policy: the floor
    pi_0_gold: float  # mean gold of pi_0's samples
    pi_0_best_of_k_gold: float  # mean over prompts of the best of K by gold: what a perfect reward model could pick
    reward_accuracy: float  # over pairs of one prompt's samples with different gold: the reward model agrees
    compared_pairs: int
    reward_best_of_k_gold: float  # gold of the sample the reward model ranks best of K (max_min's chosen)
    reward_worst_of_k_gold: float  # ... and worst (max_min's rejected)
    samples_per_prompt: int
    prompts: int
    variant: str = "short_lists"  # toy_task.variant (absent from the stamps of builds before variants)

    def problems(self) -> list[str]:
        """What falls outside the calibrated band, as sentences; empty when the build is as the README assumes."""
        band = BANDS[self.variant]
        low, high = band.pi_0_gold
        found = []
        if not low <= self.pi_0_gold <= high:
            found.append(f"pi_0's gold is {self.pi_0_gold:.3f}, outside {low}-{high}")
        if self.pi_0_best_of_k_gold > band.max_best_of_k_gold:
            found.append(f"pi_0's best of {self.samples_per_prompt} by gold is {self.pi_0_best_of_k_gold:.3f}, above "
                         f"{band.max_best_of_k_gold}: its samples already cover the answers")
        if self.reward_accuracy < MIN_REWARD_ACCURACY:
            found.append(f"the reward model ranks pi_0's samples right {self.reward_accuracy:.3f} of the time, below "
                         f"{MIN_REWARD_ACCURACY}")
        return found


def measure_calibration(assets, samples_per_prompt: int = 8, num_prompts: int = 64, seed: int = 0,
                        variant: str = "short_lists") -> Calibration:
    """Sample K answers per held-out prompt at temperature 1 (HF generate, one thread) and score them; `variant`
    (toy_task.variant) picks the band they are held to."""
    import torch

    from reward.base import RewardQuery
    from reward.classifier import BradleyTerryReward
    from reward.config import RewardConfig
    from rlhf_loop.common.files import read_jsonl
    from rlhf_loop.toy.task import gold_reward

    torch.set_num_threads(1)
    prompts = read_jsonl(assets.eval_prompts)[:num_prompts]

    def golds_of(answers: list[list[str]]) -> list[list[float]]:
        return [[gold_reward(row["prompt"], answer, row) for answer in group] for row, group in zip(prompts, answers)]

    initial = golds_of(sample_answers(assets.base_policy, prompts, samples_per_prompt, seed))
    answers = sample_answers(assets.sft_policy, prompts, samples_per_prompt, seed)
    golds = golds_of(answers)
    reward_model = BradleyTerryReward(RewardConfig(model_path=str(assets.reward_model)), "cpu")
    scores = [result.scores for result in reward_model.score([RewardQuery(row["prompt"], group)
                                                              for row, group in zip(prompts, answers)])]
    accuracy, compared = ranking_accuracy(golds, scores)
    return Calibration(
        initial_gold=_mean(initial),
        pi_0_gold=_mean(golds),
        pi_0_best_of_k_gold=statistics.fmean(max(group) for group in golds),
        reward_accuracy=accuracy,
        compared_pairs=compared,
        reward_best_of_k_gold=statistics.fmean(g[max(range(len(s)), key=s.__getitem__)] for g, s in zip(golds, scores)),
        reward_worst_of_k_gold=statistics.fmean(g[min(range(len(s)), key=s.__getitem__)] for g, s in zip(golds, scores)),
        samples_per_prompt=samples_per_prompt,
        prompts=len(prompts),
        variant=variant,
    )


def sample_answers(model_dir: Path, prompts: list[dict], samples: int, seed: int) -> list[list[str]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) for row in prompts]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=32,
                                num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [answers[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def ranking_accuracy(golds: list[list[float]], scores: list[list[float]]) -> tuple[float, int]:
    """Over all pairs of samples of the same prompt with different gold: how often the reward model agrees."""
    agree = total = 0
    for group_golds, group_scores in zip(golds, scores):
        for i in range(len(group_golds)):
            for j in range(i + 1, len(group_golds)):
                if group_golds[i] != group_golds[j]:
                    total += 1
                    agree += (group_golds[i] > group_golds[j]) == (group_scores[i] > group_scores[j])
    return agree / max(total, 1), total


def _mean(groups: list[list[float]]) -> float:
    return statistics.fmean(value for group in groups for value in group)
