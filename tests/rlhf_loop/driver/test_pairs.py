import random

import pytest

from rlhf_loop.config import PAIR_STRATEGIES
from rlhf_loop.driver.pairs import STRATEGIES, max_min, max_random, random_pair, select_pairs, several_pairs
from rlhf_loop.common.records import Episode, Prompt, Response, Rollout, Scored


def scored(index, texts, scores):
    prompt = Prompt(index=index, messages=[{"role": "user", "content": f"q{index}"}], token_ids=[1, 2, index])
    responses = [Response(text=t, token_ids=[ord(c) for c in t], finish_reason="stop") for t in texts]
    return Scored(Rollout(prompt, responses), list(scores))


def test_max_min_picks_best_and_worst():
    assert max_min([0.1, 0.9, -0.3, 0.5], random.Random(0)) == (1, 2)


def test_max_random_picks_best_and_another():
    rng = random.Random(0)
    for _ in range(50):
        chosen, rejected = max_random([0.1, 0.9, -0.3, 0.5], rng)
        assert chosen == 1 and rejected in (0, 2, 3)


def test_random_pair_orders_by_score():
    rng = random.Random(0)
    scores = [0.3, 0.1, 0.7, 0.2]
    seen = set()
    for _ in range(100):
        chosen, rejected = random_pair(scores, rng)
        assert chosen != rejected and scores[chosen] >= scores[rejected]
        seen.add((chosen, rejected))
    assert len(seen) > 3  # really random, not a fixed pair


def test_ties_and_identical_texts_are_dropped_and_counted():
    items = [
        scored(0, ["a", "b", "c"], [1.0, 0.0, 0.5]),  # kept
        scored(1, ["a", "b", "c"], [0.2, 0.2, 0.2]),  # tie
        scored(2, ["same", "same", "x"], [0.9, 0.1, 0.5]),  # best and worst identical text
        scored(3, ["a", "b"], [0.30, 0.25]),  # gap 0.05 <= min_margin 0.1: tie
    ]
    selection = select_pairs(items, "max_min", min_margin=0.1, seed=0)
    assert [p.prompt_index for p in selection.pairs] == [0]
    pair = selection.pairs[0]
    assert (pair.chosen.text, pair.rejected.text, pair.chosen_score, pair.rejected_score) == ("a", "b", 1.0, 0.0)
    assert pair.prompt_token_ids == [1, 2, 0]
    assert selection.dropped == {"tie": 2, "identical": 1}


def test_zero_margin_still_drops_exact_ties():
    selection = select_pairs([scored(0, ["a", "b"], [0.5, 0.5])], "max_min", min_margin=0.0, seed=0)
    assert selection.pairs == [] and selection.dropped == {"tie": 1}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_selection_is_reproducible_and_independent_of_order(strategy):
    rng = random.Random(1)
    items = [scored(i, [f"r{i}{k}" for k in range(6)], [rng.random() for _ in range(6)]) for i in range(20)]
    forward = select_pairs(items, strategy, 0.0, seed=7)
    backward = select_pairs(list(reversed(items)), strategy, 0.0, seed=7)
    key = lambda sel: sorted((p.prompt_index, p.chosen.text, p.rejected.text) for p in sel.pairs)
    assert key(forward) == key(backward)
    assert all(p.chosen_score > p.rejected_score for p in forward.pairs)


def test_several_pairs_take_the_best_against_the_worst_or_pair_ranks_off():
    scores = [0.5, 0.9, -0.3, 0.1, 0.7, -0.1]  # ranks: 1 (0.9), 4, 0, 3, 5, 2 (-0.3)
    assert several_pairs(scores, 3, "best_vs_worst") == [(1, 2), (1, 5), (1, 3)]
    assert several_pairs(scores, 3, "top_vs_bottom") == [(1, 2), (4, 5), (0, 3)]
    assert several_pairs([0.2, 0.2, 0.1], 2, "best_vs_worst") == [(0, 2), (0, 1)]  # ties by position


@pytest.mark.parametrize("multi", ["best_vs_worst", "top_vs_bottom"])
def test_per_prompt_gives_several_pairs_a_prompt_and_counts_flat_prompts(multi):
    items = [
        scored(0, ["a", "b", "c", "d"], [1.0, 0.0, 0.5, 0.2]),
        scored(1, ["a", "b", "c", "d"], [0.30, 0.28, 0.31, 0.29]),  # every score within min_margin 0.05: flat
        scored(2, ["a", "b", "c", "d"], [0.9, 0.1, 0.5, 0.5]),
    ]
    selection = select_pairs(items, "max_min", min_margin=0.05, seed=0, per_prompt=2, multi=multi)
    assert selection.flat_prompts == 1
    got = [(p.prompt_index, p.chosen.text, p.rejected.text) for p in selection.pairs]
    if multi == "best_vs_worst":
        assert got == [(0, "a", "b"), (0, "a", "d"), (2, "a", "b"), (2, "a", "d")]
    else:
        assert got == [(0, "a", "b"), (0, "c", "d"), (2, "a", "b")]  # prompt 2's c vs d tie (0.5, 0.5)
    assert sum(selection.dropped.values()) + len(selection.pairs) == 2 * len(items)
    assert all(p.chosen_score - p.rejected_score > 0.05 for p in selection.pairs)


def test_one_pair_a_prompt_counts_flat_prompts_without_changing_what_is_dropped():
    items = [scored(0, ["a", "b"], [0.5, 0.5]), scored(1, ["a", "b"], [0.9, 0.1])]
    selection = select_pairs(items, "random", min_margin=0.0, seed=0)
    assert selection.flat_prompts == 1 and selection.dropped == {"tie": 1} and len(selection.pairs) == 1


def test_the_config_checks_exactly_the_strategies_that_exist():
    assert tuple(STRATEGIES) == PAIR_STRATEGIES


def test_episodes_are_identical_only_when_all_their_turns_are():
    prompt = Prompt(index=0, messages=[{"role": "user", "content": "q"}], token_ids=[1, 2])

    def episode(turns):
        messages = [{"role": "assistant", "content": t} for t in turns]
        return Response(turns[-1], [ord(c) for t in turns for c in t], "stop",
                        Episode(messages, [1], len(turns), "done"))

    same_end = Scored(Rollout(prompt, [episode(["x", "apple"]), episode(["apple"])]), [1.0, 0.0])
    same_all = Scored(Rollout(prompt, [episode(["x", "apple"]), episode(["x", "apple"])]), [1.0, 0.0])
    selection = select_pairs([same_end, same_all], "max_min", 0.0, seed=0)
    assert len(selection.pairs) == 1 and selection.dropped == {"identical": 1}
