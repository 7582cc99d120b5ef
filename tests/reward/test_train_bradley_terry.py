"""Bradley-Terry training: learns gold-labelled preferences, is deterministic, and saves a model the scorer loads."""

from __future__ import annotations

import random

import pytest
import torch

from reward.train_bradley_terry import PreferencePair, train_bradley_terry
from rlhf_loop.toy.task import AnswerNoise, gold_reward, make_prompts, sample_answer

CLEAN, SLOPPY = AnswerNoise(0.0, 0.0, 0.0), AnswerNoise(filler_rate=0.6, off_category_rate=0.0, count_miss_rate=0.0)


def filler_pairs(prompts: list[dict], count: int, seed: int) -> list[PreferencePair]:
    """Clean answers against answers padded with fillers, labelled by the gold rule: a preference a tiny model
    can pick up in a few dozen steps."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < count:
        row = rng.choice(prompts)
        answers = [sample_answer(rng, row["category"], row["count"], noise) for noise in (CLEAN, SLOPPY)]
        golds = [gold_reward(row["prompt"], answer, row) for answer in answers]
        if golds[0] != golds[1]:
            chosen, rejected = answers if golds[0] > golds[1] else answers[::-1]
            pairs.append(PreferencePair(row["prompt"], chosen, rejected))
    return pairs


@pytest.fixture(scope="module")
def pairs():
    train, held_out = make_prompts(seed=0, num_train=300, num_eval=60)
    return filler_pairs(train, 384, seed=0), filler_pairs(held_out, 128, seed=1)


def train(model_dir, out_dir, train_pairs, eval_pairs, **overrides):
    settings = dict(epochs=2, lr=2e-3, batch_size=16, max_length=96, seed=0, eval_pairs=eval_pairs)
    return train_bradley_terry(model_dir, train_pairs, out_dir, **{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_reward_dir, pairs, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bradley_terry") / "rm"
    return train(tiny_reward_dir, out_dir, *pairs), out_dir


@pytest.mark.integration  # trains reward models for a minute
def test_training_learns_held_out_gold_preferences(tiny_reward_dir, pairs, trained, tmp_path):
    train_pairs, eval_pairs = pairs
    untrained = train(tiny_reward_dir, tmp_path / "untrained", train_pairs[:1], eval_pairs, lr=0.0, epochs=1)
    metrics, _ = trained
    assert metrics.eval_accuracy > 0.85
    assert metrics.eval_loss < untrained.eval_loss - 0.2
    assert 0 < metrics.train_loss < 0.6 and metrics.train_accuracy > 0.7


@pytest.mark.integration  # trains reward models for a minute
def test_the_saved_model_scores_chosen_above_rejected_through_the_scorer(pairs, trained):
    from reward.base import RewardQuery
    from reward.classifier import BradleyTerryReward
    from reward.config import RewardConfig

    metrics, model_dir = trained
    scorer = BradleyTerryReward(RewardConfig(model_path=str(model_dir), batch_size=8), "cpu")
    results = scorer.score([RewardQuery(p.prompt, [p.chosen, p.rejected]) for p in pairs[1]])
    agreement = sum(result.scores[0] > result.scores[1] for result in results) / len(results)
    assert agreement == pytest.approx(metrics.eval_accuracy)  # the scorer sees exactly what training saw


@pytest.mark.integration  # trains reward models for a minute
def test_training_is_deterministic_for_a_seed_and_starts_a_score_head_on_a_causal_lm(tiny_policy_dir, pairs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    train_pairs, eval_pairs = pairs
    runs = [train(tiny_policy_dir, tmp_path / name, train_pairs[:64], eval_pairs[:32], epochs=1, seed=seed)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    weights = [AutoModelForSequenceClassification.from_pretrained(tmp_path / name).state_dict() for name in "ab"]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert (tmp_path / "a" / "tokenizer.json").is_file()


def test_no_pairs_is_a_clear_error(tiny_reward_dir, tmp_path):
    with pytest.raises(ValueError, match="no preference pairs"):
        train_bradley_terry(tiny_reward_dir, [], tmp_path / "rm")
