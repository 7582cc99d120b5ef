"""Fixtures for the rollout engine tests: prompts, a second tiny policy as "new weights", HF greedy references.

Helpers are handed out as fixtures (tests cannot import a conftest module).
"""

from __future__ import annotations

import pytest
import torch

from policy.config import PolicyConfig
from rlhf_loop.common.records import Prompt


def _make_prompts(tokenizer, messages_list, count: int) -> list[Prompt]:
    """`count` prompts cycling through `messages_list`, rendered with the chat template; index = position."""
    prompts = []
    for index in range(count):
        messages = messages_list[index % len(messages_list)]
        token_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        prompts.append(Prompt(index=index, messages=messages, token_ids=list(token_ids)))
    return prompts


def _hf_greedy(model, prompts: list[Prompt], max_tokens: int, eos_token_id: int) -> list[list[int]]:
    """Reference greedy continuations from transformers, cut after the first EOS (as the engines report them)."""
    references = []
    for prompt in prompts:
        with torch.inference_mode():
            output = model.generate(
                torch.tensor([prompt.token_ids]), do_sample=False, max_new_tokens=max_tokens
            )
        tokens = output[0, len(prompt.token_ids) :].tolist()
        references.append(tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens)
    return references


def _named_parameters(model) -> list[tuple[str, torch.Tensor]]:
    return [(name, param.detach().clone()) for name, param in model.named_parameters()]


def _check_rollouts(rollouts, prompts, tokenizer, n: int, max_tokens: int) -> None:
    """Every response agrees with itself: EOS only as its last token iff it stopped, text = decoded tokens."""
    assert [rollout.prompt for rollout in rollouts] == prompts
    for rollout in rollouts:
        assert len(rollout.responses) == n
        for response in rollout.responses:
            tokens = response.token_ids
            assert 1 <= len(tokens) <= max_tokens
            assert tokenizer.eos_token_id not in tokens[:-1]
            stopped = tokens[-1] == tokenizer.eos_token_id
            assert response.finish_reason == ("stop" if stopped else "length")
            if not stopped:
                assert len(tokens) == max_tokens
            assert response.text == tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="session")
def policy_config(tiny_policy_dir) -> PolicyConfig:
    return PolicyConfig(model_path=str(tiny_policy_dir))


@pytest.fixture(scope="session")
def tiny_model(tiny_policy_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()


@pytest.fixture(scope="session")
def new_model(tiny_tokenizer, tmp_path_factory):
    """Same shapes as the tiny policy, other random weights: what a learner would send after training."""
    from transformers import AutoModelForCausalLM

    from rlhf_loop.toy.tiny import build_tiny_policy

    directory = build_tiny_policy(tiny_tokenizer, tmp_path_factory.mktemp("tiny_policy_new"), seed=1)
    return AutoModelForCausalLM.from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread in the test process while a module runs: on a busy 2-core machine two OpenMP threads
    spin-wait on each other and transformers' generate becomes up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prompts(tiny_tokenizer, tiny_messages) -> list[Prompt]:
    return _make_prompts(tiny_tokenizer, tiny_messages, 16)


@pytest.fixture(scope="session")
def hf_greedy(tiny_tokenizer):
    """hf_greedy(model, prompts, max_tokens) -> transformers' greedy token ids per prompt."""
    return lambda model, prompts, max_tokens: _hf_greedy(model, prompts, max_tokens, tiny_tokenizer.eos_token_id)


@pytest.fixture(scope="session")
def check_rollouts(tiny_tokenizer):
    """check_rollouts(rollouts, prompts, n, max_tokens): asserts the rollouts are well formed."""
    return lambda rollouts, prompts, n, max_tokens: _check_rollouts(rollouts, prompts, tiny_tokenizer, n, max_tokens)


@pytest.fixture(scope="session")
def named_parameters():
    """named_parameters(model) -> the (HF name, tensor) list a learner sends to the engines."""
    return _named_parameters
