"""The toy task: the gold rule and deterministic data."""

from __future__ import annotations

import random

import pytest

from rlhf_loop.toy.assets import ToyTaskConfig
from rlhf_loop.toy.task import (
    CATEGORIES,
    FILLERS,
    VARIANTS,
    AnswerNoise,
    edit_answer,
    gold_reward,
    make_preference_pairs,
    make_prompts,
    make_sft_examples,
    sample_answer,
)

FRUITS = {"category": "fruits", "count": 3}
PROMPT = [{"role": "user", "content": "Name three fruits."}]


@pytest.mark.parametrize(
    "response, expected",
    [
        ("apple, banana, cherry", 1.0),
        ("Apple,banana;  CHERRY.", 1.0),  # case and punctuation do not matter
        ("apple, banana", 2 / 3),  # too few
        ("apple, banana, cherry, grape", 3 / 4),  # too many dilutes, even with good words
        ("apple, banana, cherry, grape, lemon, mango", 3 / 6),
        ("apple, stuff, cherry", 2 / 3),  # a filler
        ("apple, tiger, cherry", 2 / 3),  # another category
        ("apple, apple, apple", 1 / 3),  # a repeat counts once
        ("", 0.0),
        ("tiger, wolf, bear", 0.0),
    ],
)
def test_gold_is_the_fraction_of_a_perfect_answer(response, expected):
    assert gold_reward(PROMPT, response, FRUITS) == pytest.approx(expected)


def test_gold_cannot_be_raised_by_length():
    words = list(CATEGORIES["fruits"])
    golds = [gold_reward(PROMPT, ", ".join(words[:length]), FRUITS) for length in range(3, 12)]
    assert golds[0] == 1.0
    assert all(later < earlier for earlier, later in zip(golds, golds[1:]))


def test_prompts_are_disjoint_deterministic_and_carry_their_answer_key():
    train, held_out = make_prompts(seed=0, num_train=300, num_eval=40)
    assert (train, held_out) == make_prompts(seed=0, num_train=300, num_eval=40)
    assert make_prompts(seed=1, num_train=300, num_eval=40)[0] != train
    texts = [row["prompt"][0]["content"] for row in train + held_out]
    assert len(set(texts)) == len(texts) == 340
    for row in train[:20]:
        assert row["category"] in row["prompt"][0]["content"] and row["count"] in (2, 3, 4, 5)
    with pytest.raises(ValueError, match="num_train_prompts"):
        make_prompts(seed=0, num_train=10**6, num_eval=1)


def test_sft_answers_are_on_task_but_imperfect_and_deterministic():
    train, _ = make_prompts(seed=0, num_train=200, num_eval=10)
    noise = AnswerNoise(filler_rate=0.3, off_category_rate=0.1, count_miss_rate=0.0)
    examples = make_sft_examples(seed=0, prompts=train, num_examples=400, noise=noise)
    assert examples == make_sft_examples(seed=0, prompts=train, num_examples=400, noise=noise)
    rows = {row["prompt"][0]["content"]: row for row in train}
    golds = [gold_reward(e["messages"][:1], e["messages"][1]["content"], rows[e["messages"][0]["content"]])
             for e in examples]
    assert [m["role"] for m in examples[0]["messages"]] == ["user", "assistant"]
    assert 0.5 < sum(golds) / len(golds) < 0.7  # about 1 - 0.3 - 0.1 of the words are right
    assert min(golds) < 0.5 and max(golds) == 1.0


def test_answer_noise_rates_show_in_the_answers():
    rng = random.Random(0)
    answers = [sample_answer(rng, "animals", 4, AnswerNoise(0.5, 0.0, 0.0)) for _ in range(500)]
    words = [word for answer in answers for word in answer.split(", ")]
    assert len(words) == 2000  # no count misses asked for
    assert 0.45 < sum(word in FILLERS for word in words) / len(words) < 0.55
    short = [sample_answer(rng, "animals", 2, AnswerNoise(0.0, 0.0, 1.0, count_miss_size=3)) for _ in range(200)]
    assert "" in short and any(len(answer.split(", ")) == 5 for answer in short)


def test_an_edit_changes_one_word_at_most():
    rng = random.Random(0)
    for _ in range(200):
        answer = sample_answer(rng, "colors", 4, AnswerNoise(0.2, 0.2, 0.5))
        before, after = answer.split(", ") if answer else [], edit_answer(rng, answer, "colors")
        after = after.split(", ") if after else []
        assert abs(len(after) - len(before)) <= 1
        if len(after) == len(before):
            assert sum(a != b for a, b in zip(before, after)) <= 1


def test_preference_pairs_are_labelled_by_gold_and_deterministic():
    train, _ = make_prompts(seed=0, num_train=200, num_eval=10)
    pairs = make_preference_pairs(seed=0, prompts=train, num_pairs=300)
    assert pairs == make_preference_pairs(seed=0, prompts=train, num_pairs=300)
    rows = {row["prompt"][0]["content"]: row for row in train}
    for pair in pairs:
        row = rows[pair.prompt[0]["content"]]
        assert gold_reward(pair.prompt, pair.chosen, row) > gold_reward(pair.prompt, pair.rejected, row)
    category_only = make_preference_pairs(seed=0, prompts=train, num_pairs=50, edited_fraction=0.0,
                                          category_fraction=1.0)
    for pair in category_only:
        row = rows[pair.prompt[0]["content"]]
        assert gold_reward(pair.prompt, pair.chosen, row) == 1.0 and len(pair.rejected.split(", ")) == row["count"]


def test_long_lists_ask_for_more_words_than_pi_0_learns_to_give():
    """long_lists: prompts ask for 6-10 words; SFT answers give 1 to half of them, so no SFT answer scores above 0.5
    and the best of many gets there; the reward model's pairs span partial answers up to full ones and beyond."""
    variant = VARIANTS["long_lists"]
    train, held_out = make_prompts(seed=0, num_train=300, num_eval=40, counts=variant.counts)
    assert {row["count"] for row in train + held_out} == set(variant.counts)
    assert "Name ten" in " ".join(row["prompt"][0]["content"] for row in train)
    noise = ToyTaskConfig(variant="long_lists").sft_noise()
    examples = make_sft_examples(seed=0, prompts=train, num_examples=600, noise=noise)
    rows = {row["prompt"][0]["content"]: row for row in train}
    lengths, golds = [], []
    for example in examples:
        row, answer = rows[example["messages"][0]["content"]], example["messages"][1]["content"]
        lengths.append((len(answer.split(", ")), row["count"]))
        golds.append(gold_reward(example["messages"][:1], answer, row))
    assert all(1 <= length <= count // 2 for length, count in lengths)
    assert {length for length, count in lengths if count == 10} == {1, 2, 3, 4, 5}  # every length up to half
    assert max(golds) == 0.5 and sum(golds) / len(golds) < 0.3
    pairs = make_preference_pairs(seed=0, prompts=train, num_pairs=400, partial_answers=True)
    answer_shares = [len(answer.split(", ")) / rows[pair.prompt[0]["content"]]["count"]
                     for pair in pairs for answer in (pair.chosen, pair.rejected) if answer]
    assert min(answer_shares) <= 0.2 and max(answer_shares) > 1.0
    assert any(share <= 0.5 for share in answer_shares) and any(0.9 <= share <= 1.0 for share in answer_shares)


def test_short_lists_is_the_default_task_and_partial_answers_are_long_lists_only():
    train, _ = make_prompts(seed=0, num_train=200, num_eval=10)
    assert {row["count"] for row in train} == set(VARIANTS["short_lists"].counts) == {2, 3, 4, 5}
    assert ToyTaskConfig().sft_noise() == AnswerNoise(0.3, 0.1, 0.0)  # full-length SFT answers
    partial = make_preference_pairs(seed=0, prompts=train, num_pairs=100, partial_answers=True)
    assert make_preference_pairs(seed=0, prompts=train, num_pairs=100) != partial
