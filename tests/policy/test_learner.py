"""The DPO learner in-process on CPU (DeepSpeed with gloo): training moves the policy the right way, the numbers it
reports match an independent computation, checkpoints resume bit-exactly, weights leave it under their HF names."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from learner_fixtures import (  # noqa: F401 (restore_environment is an autouse fixture)
    assert_same_weights,
    make_pairs,
    policy_config,
    restore_environment,
    train_config,
)

from policy.batching import batch_schedule, margin_weights, rank_micro_batches
from policy.config import LoRAConfig
from policy.learner import DPOLearner
from policy.optimization import OptimizationSpec, learning_rate_at
from rlhf_loop.common.sequences import PromptHead, cut_prompt

# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------------


def spec(schedule: str, warmup_ratio: float) -> OptimizationSpec:
    return OptimizationSpec.from_train(train_config(learning_rate=1.0, lr_schedule=schedule, warmup_ratio=warmup_ratio))


def test_learning_rate_warms_up_then_decays_to_zero():
    total = 10
    for schedule in ("constant", "linear", "cosine"):
        rates = [learning_rate_at(step, total, spec(schedule, 0.2)) for step in range(total)]
        assert rates[:2] == [0.5, 1.0]  # ceil(0.2 * 10) = 2 warmup steps, the first already moves
        decay = rates[2:]
        if schedule == "constant":
            assert decay == [1.0] * 8
        else:
            assert decay[0] == 1.0 and all(b < a for a, b in zip(decay, decay[1:])) and decay[-1] > 0
    assert learning_rate_at(7, 10, spec("linear", 0.0)) == pytest.approx(0.3)
    assert learning_rate_at(5, 10, spec("cosine", 0.0)) == pytest.approx(0.5)
    assert learning_rate_at(3, 10, spec("cosine", 0.0)) == learning_rate_at(3, 10, spec("cosine", 0.0))


def test_batch_schedule_is_deterministic_covers_each_item_once_per_epoch_and_keeps_the_partial_batch():
    steps = batch_schedule(10, epochs=2, global_batch_size=4, seed_key=(0, 1))
    assert [len(batch) for batch in steps] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(steps[:3], [])) == list(range(10)) == sorted(sum(steps[3:], []))
    assert steps[:3] != steps[3:]  # each epoch has its own order
    assert steps == batch_schedule(10, epochs=2, global_batch_size=4, seed_key=(0, 1))
    assert steps != batch_schedule(10, epochs=2, global_batch_size=4, seed_key=(0, 2))  # iterations differ


def test_ranks_split_a_global_batch_and_pad_to_the_same_number_of_micro_batches():
    batch = list("abcde")
    shares = [rank_micro_batches(batch, rank, world_size=2, micro_batch_size=2) for rank in range(2)]
    assert [len(share) for share in shares] == [2, 2]  # every rank runs the same passes
    real = sorted(item for share in shares for micro in share for item, weight in micro if weight == 1.0)
    assert real == sorted(batch)
    padding = [weight for share in shares for micro in share for _, weight in micro if weight == 0.0]
    assert len(padding) == 1
    lone = rank_micro_batches(["x"], rank=1, world_size=2, micro_batch_size=4)
    assert lone == [[("x", 0.0)]]  # a rank with nothing to do still takes part


def test_margin_weights_keep_a_mean_of_one():
    assert margin_weights([1.0, 2.0, 3.0], "linear") == pytest.approx([0.5, 1.0, 1.5])
    assert margin_weights([1.0, 2.0, 3.0], "none") == [1.0, 1.0, 1.0]
    assert margin_weights([], "linear") == []


def test_dropout_is_disabled(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from policy.deepspeed_policy import disable_dropout
    from rlhf_loop.toy.tiny import build_tiny_policy

    model = AutoModelForCausalLM.from_pretrained(
        build_tiny_policy(tiny_tokenizer, tmp_path / "dropout", attention_dropout=0.5)
    ).train()
    tokens = torch.tensor([list(range(5, 25))])
    assert not torch.equal(model(tokens).logits, model(tokens).logits)
    disable_dropout(model)
    assert torch.equal(model(tokens).logits, model(tokens).logits)
    assert model.config.attention_dropout == 0.5  # exported configs keep the original value


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def response_log_prob(model, prompt: list[int], response: list[int]) -> float:
    """Unbatched, unpadded, summed in Python: independent of the learner's batching and masking."""
    with torch.no_grad():
        log_probs = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
    return sum(log_probs[len(prompt) + i - 1, token].item() for i, token in enumerate(response))


def cut_as_the_learner_does(prompt: list[int], train, tokenizer) -> list[int]:
    """The prompt cut to train.max_prompt_length, BOS and system turn kept (rlhf_loop.common.sequences, tested
    there)."""
    return cut_prompt(prompt, train.max_prompt_length, PromptHead.of(tokenizer).length(prompt))


def independent_stats(policy, reference, pairs, train, tokenizer) -> dict[str, float]:
    """Loss and rewards of a batch, in plain Python math per pair."""
    losses, chosen_rewards, rejected_rewards = [], [], []
    for pair in pairs:
        prompt = cut_as_the_learner_does(pair.prompt_token_ids, train, tokenizer)
        ratios, lengths = [], []
        for response in (pair.chosen.token_ids, pair.rejected.token_ids):
            response = response[: train.max_length - len(prompt)]
            ratios.append(response_log_prob(policy, prompt, response) - response_log_prob(reference, prompt, response))
            lengths.append(len(response))
        chosen_rewards.append(train.beta * ratios[0])
        rejected_rewards.append(train.beta * ratios[1])
        if train.loss_type == "ipo":
            h = ratios[0] / lengths[0] - ratios[1] / lengths[1]
            losses.append((h - 1 / (2 * train.beta)) ** 2)
        else:
            x, ls = train.beta * (ratios[0] - ratios[1]), train.label_smoothing
            losses.append((1 - ls) * math.log1p(math.exp(-x)) + ls * math.log1p(math.exp(x)))
    n = len(pairs)
    return {
        "loss": sum(losses) / n,
        "chosen_reward": sum(chosen_rewards) / n,
        "rejected_reward": sum(rejected_rewards) / n,
        "reward_accuracy": sum(c > r for c, r in zip(chosen_rewards, rejected_rewards)) / n,
    }


@pytest.mark.parametrize(
    "loss", [dict(loss_type="sigmoid"), dict(loss_type="sigmoid", label_smoothing=0.2), dict(loss_type="ipo")]
)
@pytest.mark.integration  # DeepSpeed
def test_training_lowers_the_loss_and_reports_what_an_independent_computation_finds(
    loss, tiny_tokenizer, tiny_policy_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    pairs = make_pairs(tiny_tokenizer, 4)
    # One global batch holds all pairs; prompts and responses are long enough to be truncated.
    train = train_config(micro_batch_size=2, gradient_accumulation_steps=2, epochs=5, max_prompt_length=12,
                         max_length=24, **loss)
    learner = DPOLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    before = learner.named_weights()
    assert learner.begin_iteration(1, pairs, reference_dir=None) == 5

    first = learner.train_steps(1)
    assert first.step == 1 and first.total_steps == 5 and first.learning_rate == train.learning_rate
    assert first.chosen_reward == first.rejected_reward == first.margin == 0.0  # the policy starts as the reference
    assert first.loss == pytest.approx((1 / (2 * train.beta)) ** 2 if train.loss_type == "ipo" else math.log(2))
    moved = [name for (name, a), (_, b) in zip(before, learner.named_weights()) if not torch.equal(a, b)]
    assert len(moved) == len(before)

    learner.train_steps(3)
    learner.export_hf(str(tmp_path / "policy"))
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    reference = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    expected = independent_stats(policy, reference, pairs, train, tiny_tokenizer)
    kl = learner.log_ratios([p.prompt_token_ids for p in pairs], [p.chosen.token_ids for p in pairs])
    assert train.beta * sum(kl) / len(kl) == pytest.approx(expected["chosen_reward"], rel=1e-4)

    last = learner.train_steps(10)  # stops at the end of the iteration
    assert last.step == last.total_steps == 5
    assert last.loss == pytest.approx(expected["loss"], rel=1e-4)
    assert last.chosen_reward == pytest.approx(expected["chosen_reward"], rel=1e-4, abs=1e-6)
    assert last.rejected_reward == pytest.approx(expected["rejected_reward"], rel=1e-4, abs=1e-6)
    assert last.margin == pytest.approx(last.chosen_reward - last.rejected_reward, abs=1e-6)
    assert last.reward_accuracy == expected["reward_accuracy"] == 1.0
    assert last.loss < first.loss and last.margin > 0


# ---------------------------------------------------------------------------------------------------------------------
# Iterations, checkpoints, resume
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_stage", [0, 2])
@pytest.mark.integration  # DeepSpeed
def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run_exactly(
    zero_stage, tiny_tokenizer, tiny_policy_dir, tmp_path
):
    pairs = make_pairs(tiny_tokenizer, 12)
    # 3 steps per epoch, 2 epochs; warmup, decay and weight decay all in play.
    train = train_config(zero_stage=zero_stage, epochs=2, lr_schedule="cosine", warmup_ratio=0.25, weight_decay=0.01)
    checkpoint = str(tmp_path / "step_2")

    uninterrupted = DPOLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=3)
    assert uninterrupted.begin_iteration(1, pairs, reference_dir=None) == 6
    uninterrupted.train_steps(2)
    uninterrupted.save_checkpoint(checkpoint)
    expected_stats = uninterrupted.train_steps(10)
    expected_weights = uninterrupted.named_weights()
    del uninterrupted

    resumed = DPOLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=3)
    resumed.load_checkpoint(checkpoint)
    assert resumed.begin_iteration(1, pairs, reference_dir=None) == 6
    stats = resumed.train_steps(10)
    assert stats == expected_stats and stats.step == 6
    assert_same_weights(resumed.named_weights(), expected_weights)

    with pytest.raises(ValueError, match="other pairs"):
        resumed.load_checkpoint(checkpoint)
        resumed.begin_iteration(1, make_pairs(tiny_tokenizer, 12, seed=9), reference_dir=None)


@pytest.mark.integration  # DeepSpeed
def test_an_iteration_in_blocks_goes_on_from_each_block_under_one_schedule_and_resumes_exactly(
    tiny_tokenizer, tiny_policy_dir, tmp_path
):
    """train.sync_every_steps: the second block's pairs continue the step count, Adam and the learning-rate schedule
    of the first; a learner that loaded the checkpoint at the block boundary trains it to the same weights."""
    first, second = make_pairs(tiny_tokenizer, 8, seed=1), make_pairs(tiny_tokenizer, 8, seed=2)
    train = train_config(lr_schedule="cosine", warmup_ratio=0.25)  # global batch 4: 2 steps a block, 4 planned
    boundary = str(tmp_path / "step_2")
    running = DPOLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    assert running.begin_iteration(1, first, None, first_step=0, planned_steps=4) == 2
    assert running.train_steps(10).step == 2  # stops at the block's end
    running.save_checkpoint(boundary)
    assert running.begin_iteration(1, second, None, first_step=2, planned_steps=4) == 4
    stats = running.train_steps(10)
    rates = [learning_rate_at(step, 4, running._policy.spec) for step in (2, 3)]
    assert stats.step == 4 and stats.learning_rate == pytest.approx(sum(rates) / 2) and rates[1] < rates[0]

    resumed = DPOLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    resumed.load_checkpoint(boundary)
    assert resumed.begin_iteration(1, second, None, first_step=2, planned_steps=4) == 4
    assert resumed.train_steps(10) == stats
    assert_same_weights(resumed.named_weights(), running.named_weights())
    with pytest.raises(ValueError, match="train the blocks before it first"):
        resumed.begin_iteration(1, first, None, first_step=6, planned_steps=8)


@pytest.mark.parametrize("reset", [True, False])
@pytest.mark.integration  # DeepSpeed
def test_a_new_iteration_starts_at_step_0_with_fresh_adam_state_when_configured(
    reset, tiny_tokenizer, tiny_policy_dir, tmp_path
):
    """With the reset, iteration 2 of a running learner equals a fresh learner started from iteration 1's policy."""
    train = train_config(reset_optimizer_each_iteration=reset)
    first, second = make_pairs(tiny_tokenizer, 8, seed=1), make_pairs(tiny_tokenizer, 4, seed=2)
    running = DPOLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    running.begin_iteration(1, first, reference_dir=None)
    running.train_steps(2)
    running.export_hf(str(tmp_path / "iter_1"))
    assert running.begin_iteration(2, second, reference_dir=None) == 1
    assert running.train_steps(5).step == 1

    fresh = DPOLearner(policy_config(tmp_path / "iter_1"), train, device="cpu", seed=0)
    fresh.begin_iteration(2, second, reference_dir=str(tiny_policy_dir))  # the same pi_0 reference
    fresh.train_steps(1)
    identical = all(torch.equal(a, b) for (_, a), (_, b) in zip(running.named_weights(), fresh.named_weights()))
    assert identical == reset


@pytest.mark.integration  # DeepSpeed
def test_reference_previous_reloads_the_reference_from_the_given_policy(tiny_tokenizer, tiny_policy_dir, tmp_path):
    pairs = make_pairs(tiny_tokenizer, 4)
    prompts, responses = [p.prompt_token_ids for p in pairs], [p.chosen.token_ids for p in pairs]
    learner = DPOLearner(policy_config(tiny_policy_dir), train_config(), device="cpu", seed=0)
    learner.begin_iteration(1, pairs, reference_dir=None)
    learner.train_steps(1)
    assert min(abs(r) for r in learner.log_ratios(prompts, responses)) > 1e-3  # pi_1 against pi_0
    learner.export_hf(str(tmp_path / "iter_1"))

    learner.begin_iteration(2, pairs, reference_dir=str(tmp_path / "iter_1"))
    assert learner.log_ratios(prompts, responses) == pytest.approx([0.0] * 4, abs=1e-5)
    stats = learner.train_steps(1)
    assert stats.loss == pytest.approx(math.log(2)) and stats.chosen_reward == pytest.approx(0.0, abs=1e-6)


@pytest.mark.integration  # DeepSpeed
def test_checkpoints_are_written_atomically(tiny_tokenizer, tiny_policy_dir, tmp_path):
    learner = DPOLearner(policy_config(tiny_policy_dir), train_config(), device="cpu", seed=0)
    learner.begin_iteration(1, make_pairs(tiny_tokenizer, 8), reference_dir=None)
    learner.train_steps(1)
    checkpoint = tmp_path / "step_1"
    stale = tmp_path / ".step_1.partial"  # what a crash in the middle of a save leaves
    stale.mkdir()
    (stale / "half_written").write_text("")
    learner.save_checkpoint(str(checkpoint))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]
    assert not (checkpoint / "half_written").exists()

    weights = learner.named_weights()
    learner.train_steps(1)
    learner.save_checkpoint(str(checkpoint))  # replaces the older one in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]
    learner.load_checkpoint(str(checkpoint))
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(weights, learner.named_weights()))

    with pytest.raises(ValueError, match="not a learner checkpoint"):
        learner.load_checkpoint(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# Weights out: in-memory sync, HF export, ZeRO-3 gathering
# ---------------------------------------------------------------------------------------------------------------------


def hf_greedy(model, prompt: list[int], max_tokens: int, eos_token_id: int) -> list[int]:
    output = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)[0, len(prompt) :]
    tokens = output.tolist()
    return tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


@pytest.mark.integration  # DeepSpeed
def test_named_weights_and_hf_export_round_trip(tiny_tokenizer, tiny_policy_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    pairs = make_pairs(tiny_tokenizer, 4)
    learner = DPOLearner(policy_config(tiny_policy_dir), train_config(), device="cpu", seed=0)
    learner.begin_iteration(1, pairs, reference_dir=None)
    learner.train_steps(1)
    weights = learner.named_weights()
    initial = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).state_dict()
    assert [name for name, _ in weights] == list(initial)  # vLLM's load_weights takes HF names
    assert all(tensor.device.type == "cpu" and tensor.shape == initial[name].shape for name, tensor in weights)

    learner.export_hf(str(tmp_path / "policy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no temporary directory left
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert_same_weights(list(exported.state_dict().items()), weights)
    assert (tmp_path / "policy" / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "policy")
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    assert GenerationConfig.from_pretrained(tmp_path / "policy").eos_token_id == tiny_tokenizer.eos_token_id

    prompts = [p.prompt_token_ids for p in pairs]
    expected = [hf_greedy(exported, prompt, 12, tiny_tokenizer.eos_token_id) for prompt in prompts]
    assert learner.greedy_generate(prompts, 12) == expected


@pytest.mark.integration  # DeepSpeed
def test_zero3_trains_like_zero0_and_gathers_full_weights(tiny_tokenizer, tiny_policy_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pairs = make_pairs(tiny_tokenizer, 8)
    results = {}
    for stage in (0, 3):
        learner = DPOLearner(policy_config(tiny_policy_dir), train_config(zero_stage=stage), device="cpu", seed=0)
        learner.begin_iteration(1, pairs, reference_dir=None)
        stats = [learner.train_steps(1) for _ in range(2)]
        learner.export_hf(str(tmp_path / f"stage_{stage}"))
        results[stage] = (stats, learner.named_weights(), learner.greedy_generate([pairs[0].prompt_token_ids], 6))
        del learner
    (stats0, weights0, tokens0), (stats3, weights3, tokens3) = results[0], results[3]
    assert [s.loss for s in stats3] == pytest.approx([s.loss for s in stats0], rel=1e-5)
    assert [name for name, _ in weights3] == [name for name, _ in weights0]
    for (name, a), (_, b) in zip(weights0, weights3):
        assert torch.allclose(a, b, atol=1e-6), name
    assert tokens3 == tokens0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "stage_3").state_dict()
    assert_same_weights(list(exported.items()), weights3)


# ---------------------------------------------------------------------------------------------------------------------
# The menu: more losses, margin weighting, the reference freed or never loaded, LoRA
# ---------------------------------------------------------------------------------------------------------------------


def menu_loss(train, ratios, policy_log_probs, lengths) -> float:
    """One pair's loss in plain Python; `ratios` are log pi - log ref of (chosen, rejected)."""
    beta = train.beta
    if train.loss_type == "hinge":
        return max(0.0, 1 - beta * (ratios[0] - ratios[1]))
    if train.loss_type == "sigmoid_norm":
        x = beta * (ratios[0] / lengths[0] - ratios[1] / lengths[1])
    elif train.loss_type == "simpo":
        x = beta * (policy_log_probs[0] / lengths[0] - policy_log_probs[1] / lengths[1]) - train.simpo_gamma
    else:  # sigmoid, rpo
        x = beta * (ratios[0] - ratios[1])
    loss = math.log1p(math.exp(-x))
    if train.loss_type == "rpo":
        loss -= train.rpo_alpha * policy_log_probs[0] / lengths[0]
    return loss


def counting_reference_loads(monkeypatch) -> list[str]:
    """Every path the learner loads a reference model from, in order."""
    import policy.learner

    loads, load = [], policy.learner.load_reference
    monkeypatch.setattr(policy.learner, "load_reference", lambda path, *args: loads.append(path) or load(path, *args))
    return loads


@pytest.mark.parametrize("settings", [
    dict(loss_type="hinge"), dict(loss_type="sigmoid_norm"), dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5),
    dict(loss_type="rpo", rpo_alpha=0.5), dict(loss_type="sigmoid", margin_weighting="linear"),
])
def test_the_menu_losses_train_and_report_what_an_independent_computation_finds(
    settings, tiny_tokenizer, tiny_policy_dir, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    loads = counting_reference_loads(monkeypatch)
    pairs = make_pairs(tiny_tokenizer, 4)
    pairs = [replace(pair, chosen_score=1.0 + i) for i, pair in enumerate(pairs)]  # margins 1, 2, 3, 4
    train = train_config(epochs=6, **settings)
    learner = DPOLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    learner.begin_iteration(1, pairs, reference_dir=None)
    first = learner.train_steps(1)
    learner.train_steps(4)
    assert loads == ([] if train.loss_type == "simpo" else [str(tiny_policy_dir)])  # SimPO needs no reference
    learner.export_hf(str(tmp_path / "policy"))
    last = learner.train_steps(1)  # the last step runs on the exported weights
    assert last.step == last.total_steps == 6

    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    reference = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    margins = [pair.chosen_score - pair.rejected_score for pair in pairs]
    weights = [m * len(margins) / sum(margins) for m in margins] if train.margin_weighting == "linear" else [1.0] * 4
    losses = []
    for pair, weight in zip(pairs, weights):
        prompt = cut_as_the_learner_does(pair.prompt_token_ids, train, tiny_tokenizer)
        responses = [r[: train.max_length - len(prompt)] for r in (pair.chosen.token_ids, pair.rejected.token_ids)]
        policy_log_probs = [response_log_prob(policy, prompt, r) for r in responses]
        ratios = [p - response_log_prob(reference, prompt, r) for p, r in zip(policy_log_probs, responses)]
        losses.append(weight * menu_loss(train, ratios, policy_log_probs, [len(r) for r in responses]))
    assert last.loss == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert last.loss < first.loss and last.reward_accuracy == 1.0


def test_a_freed_reference_trains_exactly_like_a_kept_one_and_resumes_exactly(
    tiny_tokenizer, tiny_policy_dir, tmp_path, monkeypatch
):
    loads = counting_reference_loads(monkeypatch)
    pairs = make_pairs(tiny_tokenizer, 8)
    results = {}
    for free in (False, True):
        train = train_config(free_reference=free, epochs=2, loss_type="rpo")
        learner = DPOLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
        learner.begin_iteration(1, pairs, reference_dir=None)
        learner.train_steps(2)
        learner.save_checkpoint(str(tmp_path / f"free_{free}"))
        stats = learner.train_steps(10)
        prompts, responses = [p.prompt_token_ids for p in pairs], [p.chosen.token_ids for p in pairs]
        results[free] = (stats, learner.named_weights(), learner.log_ratios(prompts, responses))
        assert (learner._reference is None) == free  # freed: nothing kept between uses
        del learner
    assert results[True][0] == results[False][0]
    assert_same_weights(results[True][1], results[False][1])
    assert results[True][2] == results[False][2]  # the eval's KL estimate loads the reference for the occasion
    assert len(loads) == 1 + 2  # kept: loaded once; freed: for the pairs, then for log_ratios

    resumed = DPOLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    resumed.load_checkpoint(str(tmp_path / "free_True"))
    resumed.begin_iteration(1, pairs, reference_dir=None)  # recomputes the reference log-probs
    assert resumed.train_steps(10) == results[True][0]
    assert_same_weights(resumed.named_weights(), results[True][1])


def test_lora_trains_adapters_and_hands_out_merged_weights(tiny_tokenizer, tiny_policy_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loads = counting_reference_loads(monkeypatch)
    pairs = make_pairs(tiny_tokenizer, 8)
    train = train_config(lora=LoRAConfig(enabled=True, r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]),
                         learning_rate=1e-2)
    learner = DPOLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    initial = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    assert_same_weights(learner.named_weights(), list(initial.named_parameters()))  # B = 0: pi starts as pi_0

    learner.begin_iteration(1, pairs, reference_dir=None)
    first = learner.train_steps(1)
    assert first.loss == pytest.approx(math.log(2)) and first.margin == 0.0  # reference: the adapters switched off
    learner.save_checkpoint(str(tmp_path / "step_1"))
    last = learner.train_steps(10)
    assert last.loss < first.loss
    assert loads == []  # pi_0 is the policy with its adapters off: no reference model loaded

    weights = learner.named_weights()
    assert [name for name, _ in weights] == [name for name, _ in initial.named_parameters()]
    moved = {name for (name, a), (_, b) in zip(weights, initial.named_parameters()) if not torch.equal(a, b)}
    assert moved and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in moved)

    learner.export_hf(str(tmp_path / "policy"))
    learner.export_adapter(str(tmp_path / "adapter"))
    assert_same_weights(list(AutoModelForCausalLM.from_pretrained(tmp_path / "policy").named_parameters()), weights)
    merged = PeftModel.from_pretrained(initial, tmp_path / "adapter").merge_and_unload()
    for (name, a), (_, b) in zip(weights, merged.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name

    resumed = DPOLearner(policy_config(tiny_policy_dir), train, device="cpu", seed=0)
    resumed.load_checkpoint(str(tmp_path / "step_1"))
    resumed.begin_iteration(1, pairs, reference_dir=None)
    assert resumed.train_steps(10) == last
    assert_same_weights(resumed.named_weights(), weights)


# ---------------------------------------------------------------------------------------------------------------------
# bf16 on CPU: DeepSpeed's bf16 path and the LoRA merge, with tolerances that fit the dtype
# ---------------------------------------------------------------------------------------------------------------------

# bf16 keeps 8 significant bits: a relative error of 2**-8 per rounding; a few roundings in a merge
BF16_TOLERANCE = dict(rtol=2**-6, atol=2**-6)


@pytest.mark.integration  # DeepSpeed
@pytest.mark.parametrize("lora", [False, True])
def test_bf16_trains_through_deepspeeds_bf16_path_and_follows_fp32(tiny_tokenizer, tiny_policy_dir, lora):
    pairs = make_pairs(tiny_tokenizer, 12)  # three steps of 4
    runs = {}
    for dtype in ("float32", "bfloat16"):
        train = train_config(learning_rate=1e-2 if lora else 1e-3, lora=LoRAConfig(enabled=lora))
        learner = DPOLearner(replace(policy_config(tiny_policy_dir), dtype=dtype), train, device="cpu", seed=0)
        learner.begin_iteration(1, pairs, reference_dir=None)
        losses = [learner.train_steps(1).loss for _ in range(3)]
        runs[dtype] = (learner, losses, learner.named_weights())
    learner, bf16_losses, bf16_weights = runs["bfloat16"]
    _, fp32_losses, fp32_weights = runs["float32"]
    assert learner._policy.engine.bfloat16_enabled()
    assert all(math.isfinite(loss) for loss in bf16_losses), (bf16_losses, fp32_losses)
    assert bf16_losses[-1] < bf16_losses[0], "bf16 training did not lower the loss"
    assert bf16_losses == pytest.approx(fp32_losses, abs=0.02)  # the same run, up to bf16 rounding
    assert {tensor.dtype for _, tensor in bf16_weights} == {torch.bfloat16}
    assert [name for name, _ in bf16_weights] == [name for name, _ in fp32_weights]
    moved = sum(not torch.equal(a.float(), b) for (_, a), (_, b) in zip(bf16_weights, fp32_weights))
    assert moved > 0
    for (name, a), (_, b) in zip(bf16_weights, fp32_weights):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.02, msg=name)  # three steps apart in rounding
    if lora:  # the merge (W + scale B A) done beside W in bf16 matches peft's own merge of the same adapters
        merged = dict(bf16_weights)
        reference = learner._policy.module.merge_and_unload().state_dict()
        assert set(merged) <= set(reference)
        assert any(".q_proj." in name for name in merged)  # the adapted layers are among them
        for name, tensor in merged.items():
            torch.testing.assert_close(tensor, reference[name].cpu(), **BF16_TOLERANCE, msg=name)
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.bfloat16).state_dict()
        # A merge that dropped the adapters would be off by their delta: it must exceed what the check tolerates there.
        margins = [((merged[name].float() - base[name].float()).abs()
                    - BF16_TOLERANCE["rtol"] * base[name].float().abs()).max().item() for name in merged]
        assert max(margins) > 2 * BF16_TOLERANCE["atol"], "the adapters moved too little for the merge check to fail"
