"""The reference log-probs computed ahead (DPOLearner.prepare_pairs): bit-identical to those computed at once, reused
only for the same iteration, reference and pairs, and computed only where the reference is at hand."""

from __future__ import annotations

import shutil

import pytest
from learner_fixtures import (  # noqa: F401 (restore_environment is an autouse fixture)
    make_pairs,
    policy_config,
    restore_environment,
    train_config,
)

from policy.config import LoRAConfig
from policy.learner import DPOLearner
from policy.prepared_references import PreparedReferences


def test_only_whole_blocks_are_due_and_only_a_matching_prefix_is_reused():
    prepared = PreparedReferences(iteration=2, reference_dir="/ref", block=4)
    assert prepared.add("abc") == []
    due = prepared.add("defghij")
    assert due == list("abcdefgh")  # two blocks; i, j wait for more pairs
    prepared.computed([(float(i), -float(i)) for i in range(8)])
    assert prepared.add("k") == []
    assert prepared.add("l") == list("ijkl")

    pairs = list("abcdefghijklmn")
    assert prepared.reusable(2, "/ref/", pairs) == [(float(i), -float(i)) for i in range(8)]
    assert prepared.reusable(3, "/ref", pairs) == []  # another iteration
    assert prepared.reusable(2, "/other", pairs) == []  # another reference
    assert prepared.reusable(2, "/ref", list("abcXefghijkl")) == []  # other pairs
    assert prepared.reusable(2, "/ref", list("abcdefg")) == []  # fewer pairs than were computed


class CountingLearner(DPOLearner):
    """Records how many pairs each reference computation covers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.computed: list[int] = []

    def _reference_log_probs(self, pairs):
        if pairs:
            self.computed.append(len(pairs))
        return super()._reference_log_probs(pairs)


def references(learner: DPOLearner) -> list[tuple[float, float]]:
    return [(pair.reference_chosen, pair.reference_rejected) for pair in learner._pairs]


def test_references_prepared_in_uneven_pieces_are_bit_identical_to_those_computed_at_once(
    tiny_tokenizer, tiny_policy_dir
):
    pairs = make_pairs(tiny_tokenizer, 11)
    train = train_config(micro_batch_size=4, gradient_accumulation_steps=1)
    reference = str(tiny_policy_dir)

    at_once = CountingLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    at_once.begin_iteration(1, pairs, reference)
    assert at_once.computed == [11]

    ahead = CountingLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    for piece in (pairs[:3], pairs[3:10], pairs[10:]):
        ahead.prepare_pairs(1, piece, reference)
    assert ahead.computed == [8]  # blocks of 4: the first two, once 10 pairs were in
    assert ahead.begin_iteration(1, pairs, reference) == at_once.begin_iteration(1, pairs, reference)
    assert ahead.computed == [8, 3]  # only the rest, from the block boundary on
    assert references(ahead) == references(at_once)  # exactly: the same micro-batches ran
    assert len({chosen for chosen, _ in references(ahead)}) > 1
    assert ahead.train_steps(10) == at_once.train_steps(10)


@pytest.mark.parametrize("mismatch", ["pairs", "iteration", "reference"])
def test_a_preparation_for_other_pairs_iteration_or_reference_is_discarded(
    mismatch, tiny_tokenizer, tiny_policy_dir, tmp_path
):
    pairs = make_pairs(tiny_tokenizer, 8)
    train = train_config(micro_batch_size=4, gradient_accumulation_steps=1)
    reference = str(tiny_policy_dir)
    expected = CountingLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    expected.begin_iteration(2, pairs, reference)

    learner = CountingLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    if mismatch == "pairs":
        learner.prepare_pairs(2, make_pairs(tiny_tokenizer, 8, seed=9), reference)
    elif mismatch == "iteration":
        learner.prepare_pairs(1, pairs, reference)
    else:
        shutil.copytree(tiny_policy_dir, tmp_path / "other")  # the same weights elsewhere: still another reference
        learner.prepare_pairs(2, pairs, str(tmp_path / "other"))
    assert learner.computed == [8]
    learner.begin_iteration(2, pairs, reference)
    assert learner.computed == [8, 8]  # nothing reused
    assert references(learner) == references(expected)
    assert learner._prepared is None


@pytest.mark.parametrize("settings, prepares", [
    (dict(), True),
    (dict(free_reference=True), False),  # the reference would be loaded again for every shard
    (dict(loss_type="simpo"), False),  # no reference at all
    (dict(free_reference=True, lora=LoRAConfig(enabled=True, r=4, target_modules=["q_proj"])), True),  # adapters off
])
def test_references_are_prepared_only_where_the_reference_is_at_hand(
    settings, prepares, tiny_tokenizer, tiny_policy_dir
):
    train = train_config(micro_batch_size=2, gradient_accumulation_steps=1, **settings)
    learner = CountingLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    learner.prepare_pairs(1, make_pairs(tiny_tokenizer, 4), str(tiny_policy_dir))
    assert learner.computed == ([4] if prepares else [])
