"""Build (or reuse) the toy task's assets and print how well calibrated they are.

    python scripts/build_toy_assets.py [--dir .cache/toy_task] [--samples 8] [--prompts 64] [key=value ...]

`key=value` overrides fields of ToyTaskConfig (e.g. sft_epochs=8). The report samples K answers per held-out prompt
at temperature 1 with HF generate and gives: the gold reward of the random-init and the SFT policy (mean, spread
across all samples and within a prompt, best of K by gold), the reward model's accuracy on held-out synthetic
pairs and on pairs of SFT samples, and the gold of the SFT sample the reward model ranks best of K (what a DPO pair
from max_min selection would take as chosen).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from reward.base import RewardQuery
from reward.classifier import BradleyTerryReward
from reward.config import RewardConfig
from rlhf_loop.rundir import read_jsonl
from rlhf_loop.toy.assets import ToyTaskConfig, ensure_toy_assets
from rlhf_loop.toy.task import gold_reward


def parse_overrides(pairs: list[str]) -> dict:
    fields = {field.name: field.type for field in dataclasses.fields(ToyTaskConfig)}
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown ToyTaskConfig field {key!r}; choose from {sorted(fields)}")
        overrides[key] = type(getattr(ToyTaskConfig(), key))(value)
    return overrides


@torch.no_grad()
def sample_answers(model_dir, prompts: list[dict], samples: int, seed: int) -> list[list[str]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) for row in prompts]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    torch.manual_seed(seed)
    output = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=32,
                            num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [answers[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def golds_of(prompts: list[dict], answers: list[list[str]]) -> list[list[float]]:
    return [[gold_reward(row["prompt"], answer, row) for answer in group] for row, group in zip(prompts, answers)]


def describe_policy(name: str, golds: list[list[float]]) -> None:
    flat = [gold for group in golds for gold in group]
    print(f"{name}: gold mean {statistics.mean(flat):.3f}, std {statistics.pstdev(flat):.3f}, "
          f"std within a prompt {statistics.mean(statistics.pstdev(group) for group in golds):.3f}, "
          f"best of {len(golds[0])} by gold {statistics.mean(max(group) for group in golds):.3f}")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=ToyTaskConfig.dir)
    parser.add_argument("--samples", type=int, default=8, help="answers per prompt (K)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts to sample")
    parser.add_argument("overrides", nargs="*", help="ToyTaskConfig fields as key=value")
    args = parser.parse_args()

    cfg = ToyTaskConfig(enabled=True, dir=args.dir, **parse_overrides(args.overrides))
    started = time.monotonic()
    assets = ensure_toy_assets(cfg)
    stamp = json.loads(assets.stamp.read_text())
    print(f"assets ready in {time.monotonic() - started:.1f} s (the build itself took {stamp['build_seconds']} s)")
    print(f"reward model: held-out synthetic pair accuracy {stamp['reward_model']['eval_accuracy']:.3f}")

    torch.set_num_threads(1)
    prompts = read_jsonl(assets.eval_prompts)[: args.prompts]
    describe_policy("random-init policy", golds_of(prompts, sample_answers(assets.base_policy, prompts, args.samples, 0)))
    answers = sample_answers(assets.sft_policy, prompts, args.samples, 0)
    golds = golds_of(prompts, answers)
    describe_policy("SFT policy (pi_0)", golds)
    reward_model = BradleyTerryReward(RewardConfig(model_path=str(assets.reward_model)), "cpu")
    scores = [result.scores for result in reward_model.score([RewardQuery(row["prompt"], group)
                                                              for row, group in zip(prompts, answers)])]
    accuracy, compared = ranking_accuracy(golds, scores)
    best = [group_golds[max(range(len(s)), key=s.__getitem__)] for group_golds, s in zip(golds, scores)]
    worst = [group_golds[min(range(len(s)), key=s.__getitem__)] for group_golds, s in zip(golds, scores)]
    print(f"reward model on SFT samples: pair accuracy {accuracy:.3f} over {compared} pairs; gold of its best of "
          f"{args.samples} {statistics.mean(best):.3f}, of its worst {statistics.mean(worst):.3f}")


if __name__ == "__main__":
    main()
