"""The learner in Ray actors: one rank behaves like the in-process learner; two ranks on CPU (gloo) train like one
rank with the same global batch."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from learner_fixtures import (  # noqa: F401 (restore_environment is an autouse fixture)
    assert_same_weights,
    make_pairs,
    policy_config,
    restore_environment,
    train_config,
)

from policy.learner import DPOLearner
from policy.learner_group import LearnerGroup
from rlhf_loop.common.actor_calls import ActorDied

pytestmark = pytest.mark.integration  # starts Ray actors


def assert_close_weights(a, b) -> None:
    assert [name for name, _ in a] == [name for name, _ in b]
    for (name, x), (_, y) in zip(a, b):
        assert torch.allclose(x, y, atol=1e-5), name


def test_one_worker_group_behaves_like_the_in_process_learner(ray_local, tiny_tokenizer, tiny_policy_dir, tmp_path):
    pairs = make_pairs(tiny_tokenizer, 8)
    prompts, responses = [p.prompt_token_ids for p in pairs], [p.chosen.token_ids for p in pairs]
    group = LearnerGroup(policy_config(tiny_policy_dir), train_config(), device="cpu", seed=0)
    try:
        assert group.begin_iteration(1, pairs, reference_dir=None) == 2
        first = group.train_steps(1)
        group.save_checkpoint(str(tmp_path / "step_1"))
        second = group.train_steps(5)
        weights_ref = group.weights_ref()
        assert isinstance(weights_ref, ray_local.ObjectRef)
        weights = ray_local.get(weights_ref)
        group.export_hf(str(tmp_path / "policy"))
        tokens = group.greedy_generate(prompts, 8)
        ratios = group.log_ratios(prompts, responses)

        group.load_checkpoint(str(tmp_path / "step_1"))
        assert group.begin_iteration(1, pairs, reference_dir=None) == 2
        assert group.train_steps(5) == second  # resumed in the actor: exact
        assert_same_weights(ray_local.get(group.weights_ref()), weights)
    finally:
        group.shutdown()

    local = DPOLearner(policy_config(tiny_policy_dir), train_config(), device="cpu", seed=0)
    local.begin_iteration(1, pairs, reference_dir=None)
    # Another process may use another thread count, hence another float summation order: close, not equal.
    assert local.train_steps(1).loss == pytest.approx(first.loss, rel=1e-5)
    assert local.train_steps(5).loss == pytest.approx(second.loss, rel=1e-5)
    assert_close_weights(local.named_weights(), weights)
    assert local.greedy_generate(prompts, 8) == tokens
    assert local.log_ratios(prompts, responses) == pytest.approx(ratios, rel=1e-4, abs=1e-4)
    assert (tmp_path / "policy" / "model.safetensors").is_file()


def test_two_cpu_workers_train_like_one_worker_with_the_same_global_batch(
    ray_local, tiny_tokenizer, tiny_policy_dir, tmp_path
):
    pairs = make_pairs(tiny_tokenizer, 10)  # global batch 8: the second step is partial and leaves rank 1 short
    two_ranks = train_config(num_workers=2, micro_batch_size=2, gradient_accumulation_steps=2, zero_stage=2)
    group = LearnerGroup(policy_config(tiny_policy_dir), two_ranks, device="cpu", seed=0)
    try:
        assert group.begin_iteration(1, pairs, reference_dir=None) == 2
        stats = group.train_steps(2)
        group.save_checkpoint(str(tmp_path / "step_2"))
        weights = ray_local.get(group.weights_ref())
    finally:
        group.shutdown()
    assert {"engine", "rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in (tmp_path / "step_2").iterdir()}

    one_rank = train_config(micro_batch_size=2, gradient_accumulation_steps=4)
    local = DPOLearner(policy_config(tiny_policy_dir), one_rank, device="cpu", seed=0)
    local.begin_iteration(1, pairs, reference_dir=None)
    assert local.train_steps(2).loss == pytest.approx(stats.loss, rel=1e-5)
    assert_close_weights(local.named_weights(), weights)


def test_two_ranks_prepared_ahead_in_uneven_pieces_train_exactly_as_without(
    ray_local, tiny_tokenizer, tiny_policy_dir, tmp_path
):
    pairs = make_pairs(tiny_tokenizer, 10)  # blocks of micro batch 2 x 2 ranks: two computed ahead, 2 pairs left
    two_ranks = train_config(num_workers=2, micro_batch_size=2, gradient_accumulation_steps=2, zero_stage=2)
    reference = str(tiny_policy_dir)
    group = LearnerGroup(policy_config(tiny_policy_dir), two_ranks, device="cpu", seed=0)
    try:
        group.save_checkpoint(str(tmp_path / "start"))
        for piece in (pairs[:3], pairs[3:7], pairs[7:]):
            group.prepare_pairs(1, piece, reference)  # returns at once; the ranks run it before begin_iteration
        assert group.begin_iteration(1, pairs, reference) == 2
        prepared = group.train_steps(2)
        group.load_checkpoint(str(tmp_path / "start"))
        assert group.begin_iteration(1, pairs, reference) == 2
        assert group.train_steps(2) == prepared
    finally:
        group.shutdown()


def test_sft_runs_in_its_own_actor(ray_local, tiny_policy_dir, tiny_messages, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from policy.batching import response_log_probs
    from policy.config import SFTConfig
    from policy.learner_group import SFTActor
    from policy.sft import to_examples
    from rlhf_loop.common.sequences import pad_pairs

    conversations = [m + [{"role": "assistant", "content": "One two three."}] for m in tiny_messages]
    sft = SFTActor(policy_config(tiny_policy_dir), SFTConfig(micro_batch_size=2), device="cpu", seed=0)
    try:
        assert sft.begin(conversations) == 2
        before = sft.mean_nll(conversations)
        stats = sft.train_steps(5)
        after = sft.mean_nll(conversations)
        sft.export_hf(str(tmp_path / "sft"))
    finally:
        sft.shutdown()
    assert stats.step == 2 and stats.loss > 0 and after < before
    # the exported model is the trained one: its NLL on the same conversations is the learner's `after`, not `before`
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "sft")
    examples = to_examples(tokenizer, conversations)
    batch = pad_pairs([(e.prompt_token_ids, e.response_token_ids) for e in examples], tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        log_probs, counts = response_log_probs(exported, batch)
    assert -log_probs.sum().item() / counts.sum().item() == pytest.approx(after, abs=1e-4)


def test_a_killed_learner_stops_the_run_with_one_line(ray_local, tiny_tokenizer, tiny_policy_dir):
    pairs = make_pairs(tiny_tokenizer, 8)
    group = LearnerGroup(policy_config(tiny_policy_dir), train_config(), device="cpu", seed=0)
    try:
        group.begin_iteration(1, pairs, reference_dir=None)
        (rank_0,) = group.placement()
        assert rank_0["pid"] != os.getpid() and rank_0["node_id"]
        os.kill(rank_0["pid"], signal.SIGKILL)
        with pytest.raises(ActorDied, match="learner rank 0 died during train") as error:
            group.train_steps(1)
        assert "\n" not in str(error.value) and "rlhf-loop resume" in str(error.value)
    finally:
        group.shutdown()
