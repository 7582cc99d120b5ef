"""The toy task as shipped is calibrated as the README assumes: the real recipe, built here, lands pi_0's gold in its
band and gives a reward model that ranks pi_0's own samples right often enough."""

from __future__ import annotations

import json

import pytest

from rlhf_loop.toy.assets import ToyTaskConfig, calibration_problems, ensure_toy_assets
from rlhf_loop.toy.calibration import BANDS, MIN_REWARD_ACCURACY, PI_0_GOLD_BAND, Calibration, ranking_accuracy


def test_ranking_accuracy_counts_only_pairs_with_different_gold():
    golds = [[1.0, 0.5, 0.5], [0.2, 0.2]]
    scores = [[3.0, 1.0, 2.0], [0.0, 1.0]]
    # prompt 1: (1.0 > 0.5) twice agrees; the 0.5/0.5 pair and prompt 2's tie are not counted
    assert ranking_accuracy(golds, scores) == (1.0, 2)
    assert ranking_accuracy([[1.0, 0.0]], [[0.0, 1.0]]) == (0.0, 1)


def test_problems_name_what_is_off_the_band():
    fields = dict(initial_gold=0.0, pi_0_best_of_k_gold=0.9, compared_pairs=100, reward_best_of_k_gold=0.8,
                  reward_worst_of_k_gold=0.3, samples_per_prompt=8, prompts=64)
    assert Calibration(pi_0_gold=0.55, reward_accuracy=0.9, **fields).problems() == []
    problems = Calibration(pi_0_gold=0.29, reward_accuracy=0.7, **fields).problems()
    assert len(problems) == 2 and "0.290" in problems[0] and "0.700" in problems[1]


def test_long_lists_are_held_to_their_own_band_where_pi_0_s_best_of_k_is_far_from_the_answers():
    fields = dict(initial_gold=0.0, compared_pairs=100, reward_best_of_k_gold=0.4, reward_worst_of_k_gold=0.05,
                  samples_per_prompt=8, prompts=64, reward_accuracy=0.9)
    assert Calibration(pi_0_gold=0.2, pi_0_best_of_k_gold=0.45, variant="long_lists", **fields).problems() == []
    problems = Calibration(pi_0_gold=0.2, pi_0_best_of_k_gold=0.6, variant="long_lists", **fields).problems()
    assert len(problems) == 1 and "best of 8 by gold is 0.600, above 0.5" in problems[0]
    # the short task's pi_0 would be off this band on both counts
    assert len(Calibration(pi_0_gold=0.57, pi_0_best_of_k_gold=0.89, variant="long_lists", **fields).problems()) == 2


@pytest.mark.integration  # the long_lists recipe: a few minutes of SFT and reward-model training on one core
def test_the_long_lists_recipe_lands_in_its_band(tmp_path):
    assets = ensure_toy_assets(ToyTaskConfig(enabled=True, dir=str(tmp_path / "toy_task"), variant="long_lists"))
    measured = json.loads(assets.stamp.read_text())["calibration"]
    band = BANDS["long_lists"]
    assert measured["variant"] == "long_lists"
    assert measured["pi_0_best_of_k_gold"] <= band.max_best_of_k_gold, measured
    assert band.pi_0_gold[0] <= measured["pi_0_gold"] <= band.pi_0_gold[1], measured
    assert measured["reward_accuracy"] >= MIN_REWARD_ACCURACY, measured
    assert calibration_problems(assets) == []


@pytest.mark.integration  # the real recipe: about two minutes of SFT and reward-model training on one core
def test_the_shipped_recipe_lands_in_its_band(tmp_path):
    assets = ensure_toy_assets(ToyTaskConfig(enabled=True, dir=str(tmp_path / "toy_task")))
    measured = json.loads(assets.stamp.read_text())["calibration"]
    low, high = PI_0_GOLD_BAND
    assert low <= measured["pi_0_gold"] <= high, measured
    assert measured["reward_accuracy"] >= MIN_REWARD_ACCURACY, measured
    assert measured["reward_best_of_k_gold"] > measured["pi_0_gold"] > measured["reward_worst_of_k_gold"], measured
    assert measured["compared_pairs"] > 500  # enough pairs for the accuracy to mean something
    assert calibration_problems(assets) == []
