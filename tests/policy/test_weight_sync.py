"""After a sync, every rollout engine samples from exactly the learner's policy: greedy outputs agree token for token."""

from __future__ import annotations

import pytest

from policy.config import LoRAConfig, RolloutConfig, TrainConfig
from rlhf_loop.records import Pair, Response
from rlhf_loop.stages import sync_weights

pytestmark = pytest.mark.integration  # starts Ray actors


def pairs_for(prompts, tokenizer) -> list[Pair]:
    def response(text: str) -> Response:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return Response(text=text, token_ids=ids, finish_reason="stop")

    return [Pair(prompt_index=p.index, prompt_messages=p.messages, prompt_token_ids=p.token_ids,
                 chosen=response("apples, bananas and cherries"), rejected=response("the lazy dog"),
                 chosen_score=1.0, rejected_score=0.0) for p in prompts]


@pytest.mark.parametrize(("engine", "lora"), [("vllm", False), ("hf", False), ("vllm", True)])
def test_every_engine_matches_the_learner_after_sync(engine, lora, ray_local, policy_config, prompts, tiny_tokenizer):
    from policy.learner_group import LearnerGroup
    from policy.rollout_group import RolloutGroup

    train = TrainConfig(learning_rate=5e-2 if lora else 5e-3, micro_batch_size=4, lora=LoRAConfig(enabled=lora))
    learner = LearnerGroup(policy_config, train, "cpu", seed=0)  # with LoRA the engines get the merged weights
    rollout = RolloutGroup(policy_config, RolloutConfig(engine=engine, num_engines=2), "cpu", max_model_len=128,
                           seed=0)
    try:
        fixed = prompts[:6]
        max_tokens = 16
        before = rollout.greedy(fixed, max_tokens)
        learner.begin_iteration(1, pairs_for(prompts, tiny_tokenizer), reference_dir=None)
        learner.train_steps(4)
        expected = learner.greedy_generate([p.token_ids for p in fixed], max_tokens)
        assert before[0] != expected, "training did not change the greedy outputs: the test could not fail"

        sync_weights(learner, rollout)

        after = rollout.greedy(fixed, max_tokens)
        assert len(after) == 2
        for engine_outputs in after:
            assert engine_outputs == expected
    finally:
        rollout.shutdown()
        learner.shutdown()
