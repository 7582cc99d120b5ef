"""HFEngine: well-formed K responses, per-prompt determinism, in-place weight updates (in the test process)."""

from __future__ import annotations

import pytest

from policy.config import RolloutConfig
from policy.hf_engine import HFEngine
from policy.rollout_protocol import Sampling

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 32
SAMPLING = Sampling(n=4, temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS, seed=7)


@pytest.fixture(scope="module")
def engine(policy_config):
    return HFEngine(policy_config, RolloutConfig(engine="hf"), "cpu", max_model_len=256, seed=0)


@pytest.fixture(scope="module")
def rollouts(engine, prompts):
    return engine.generate(prompts, SAMPLING)


def test_k_responses_per_prompt_are_well_formed(rollouts, prompts, check_rollouts):
    check_rollouts(rollouts, prompts, SAMPLING.n, MAX_TOKENS)
    reasons = {response.finish_reason for rollout in rollouts for response in rollout.responses}
    assert reasons == {"stop", "length"}
    assert all(len({tuple(r.token_ids) for r in rollout.responses}) > 1 for rollout in rollouts)


def test_same_seed_same_responses_whatever_the_other_prompts(engine, prompts, rollouts):
    assert engine.generate([prompts[5], prompts[2]], SAMPLING) == [rollouts[5], rollouts[2]]
    reseeded = engine.generate(prompts[:2], Sampling(**{**SAMPLING.__dict__, "seed": 8}))
    assert reseeded != rollouts[:2]


def test_top_p_narrows_the_samples(engine, prompts, rollouts):
    narrow = engine.generate(prompts[:2], Sampling(**{**SAMPLING.__dict__, "top_p": 1e-6}))
    for rollout in narrow:
        assert len({tuple(r.token_ids) for r in rollout.responses}) == 1


def test_update_weights_gives_the_new_models_greedy_tokens(
    policy_config, prompts, tiny_model, new_model, hf_greedy, named_parameters
):
    engine = HFEngine(policy_config, RolloutConfig(engine="hf"), "cpu", max_model_len=256, seed=0)
    greedy = Sampling(n=2, temperature=0.0, top_p=1.0, max_tokens=MAX_TOKENS, seed=0)

    def greedy_tokens():
        rollouts = engine.generate(prompts[:3], greedy)
        assert all(r.responses[0] == r.responses[1] for r in rollouts)
        return [r.responses[0].token_ids for r in rollouts]

    old_reference = hf_greedy(tiny_model, prompts[:3], MAX_TOKENS)
    new_reference = hf_greedy(new_model, prompts[:3], MAX_TOKENS)
    assert new_reference != old_reference
    assert greedy_tokens() == old_reference
    engine.update_weights(named_parameters(new_model))
    assert greedy_tokens() == new_reference


def test_update_weights_rejects_unknown_names(engine, new_model, named_parameters):
    with pytest.raises(ValueError, match="does not have"):
        engine.update_weights([("model.not_a_layer.weight", named_parameters(new_model)[0][1])])
