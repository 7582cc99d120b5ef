"""Episodes in a rollout engine: K per prompt, turn by turn, all live episodes of a call batched per turn; their
tokens are exactly the conversation the chat template renders, with the loss mask on the policy's tokens only
(checked token by token against transformers' assistant mask of a template that marks assistant turns)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from policy.config import EnvironmentConfig
from policy.episodes import EpisodeRunner
from policy.rollout_protocol import Sampling
from rlhf_loop.common.chat import chat_token_ids
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.records import Prompt, Response, Rollout
from rlhf_loop.common.seeds import derived_seed
from tests.rlhf_loop.common.test_chat import MARKED_TEMPLATE

ENVIRONMENT = '''
from rlhf_loop.common.environments import Step

class SayApple:
    """Done when the assistant says apple (outcome 1); otherwise asked again (outcome 0)."""

    def reset(self, row):
        return [{"role": "user", "content": row["question"]}]

    def step(self, message):
        if message["content"] == "apple":
            return Step(done=True, outcome=1.0)
        return Step([{"role": "user", "content": "Say apple again."}], outcome=0.0)
'''
ANSWERS = ("apple", "cherry", "banana", "dog")
# ChatML's shape on the tiny tokenizer: a newline after each end-of-turn token, which the policy never samples
CHATML_LIKE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] + '<|eot_id|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


class ScriptedEngine:
    """Samples one of ANSWERS per request, picked by its seed (the call's seed and the request's index), each ended
    by the end-of-turn token; records the size of each call."""

    def __init__(self, tokenizer, finish_reason: str = "stop"):
        self.tokenizer, self.finish_reason, self.calls = tokenizer, finish_reason, []

    def generate(self, prompts, sampling):
        assert sampling.n == 1
        self.calls.append(len(prompts))
        rollouts = []
        for prompt in prompts:
            text = ANSWERS[derived_seed(sampling.seed, prompt.index) % len(ANSWERS)]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ids + [self.tokenizer.eos_token_id] if self.finish_reason == "stop" else ids
            rollouts.append(Rollout(prompt, [Response(text, ids, self.finish_reason)]))
        return rollouts


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "say_apple.py"
    path.write_text(ENVIRONMENT)
    return f"{path}:SayApple"


def prompts_of(tokenizer, questions, first_index=0):
    return [Prompt(first_index + i, [{"role": "user", "content": q}],
                   chat_token_ids(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True),
                   {"question": q}) for i, q in enumerate(questions)]


SAMPLING = Sampling(n=4, temperature=1.0, top_p=1.0, max_tokens=8, seed=7)


def run(tokenizer, factory, prompts, sampling=SAMPLING, engine=None, **budgets):
    engine = engine or ScriptedEngine(tokenizer)
    cfg = EnvironmentConfig(factory=factory, **{"max_turns": 4, "max_episode_tokens": 200, **budgets})
    return EpisodeRunner(cfg, tokenizer).run(engine, prompts, sampling), engine


def test_k_episodes_per_prompt_each_turn_in_one_call(tiny_tokenizer, factory):
    prompts = prompts_of(tiny_tokenizer, ["Say apple.", "Say apple now."])
    rollouts, engine = run(tiny_tokenizer, factory, prompts)
    assert [r.prompt for r in rollouts] == prompts and all(len(r.responses) == 4 for r in rollouts)
    episodes = [response.episode for r in rollouts for response in r.responses]
    assert engine.calls[0] == 8  # the first turn of every episode of the call at once
    assert engine.calls == sorted(engine.calls, reverse=True) and len(engine.calls) == max(e.turns for e in episodes)
    for rollout in rollouts:
        for response in rollout.responses:
            episode = response.episode
            assert episode.end in ("done", "max_turns")
            assert response.text == [m for m in episode.messages if m["role"] == "assistant"][-1]["content"]
            assert (episode.outcome == 1.0) == (episode.end == "done") == (response.text == "apple")
            assert response.finish_reason == ("stop" if episode.end == "done" else "length")
            assert len(episode.loss_mask) == len(response.token_ids)
    assert {e.turns for e in episodes} != {1}  # some episodes were asked again


@pytest.mark.parametrize("template", ["llama3", "chatml_like"])
def test_episode_tokens_are_the_rendered_conversation_and_the_mask_is_the_assistants(tiny_tokenizer, factory,
                                                                                      template):
    """Token by token: prompt + episode tokens are the whole conversation as the template renders it, and the loss
    mask is 1 exactly where transformers' assistant mask (of the template with {% generation %} blocks) is."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    if template == "chatml_like":
        tokenizer.chat_template = CHATML_LIKE
    prompts = prompts_of(tokenizer, ["Say apple."])
    rollouts, _ = run(tokenizer, factory, prompts, replace(SAMPLING, n=8))
    checked = 0
    for response in rollouts[0].responses:
        episode = response.episode
        conversation = [*prompts[0].messages, *episode.messages]
        rendered = chat_token_ids(tokenizer, conversation)
        closing = len(rendered) - len(prompts[0].token_ids) - len(response.token_ids)  # after the last EOS
        assert closing == (1 if template == "chatml_like" else 0)
        assert prompts[0].token_ids + response.token_ids == rendered[:len(rendered) - closing]
        if template == "llama3":
            marked = copy.deepcopy(tokenizer)
            marked.chat_template = MARKED_TEMPLATE
            oracle = marked.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            assert list(oracle["input_ids"]) == rendered
            assert episode.loss_mask == list(oracle["assistant_masks"])[len(prompts[0].token_ids):]
        else:  # the newline after each end-of-turn token is the template's, not sampled
            newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
            eos = [i for i, token in enumerate(response.token_ids) if token == tokenizer.eos_token_id]
            assert all(response.token_ids[i + 1:i + 1 + len(newline)] == newline and not any(
                episode.loss_mask[i + 1:i + 1 + len(newline)]) for i in eos[:-1])
        sampled = [token for token, mask in zip(response.token_ids, episode.loss_mask) if mask]
        turns = [m["content"] for m in episode.messages if m["role"] == "assistant"]
        assert sampled == [t for text in turns for t in tokenizer(text, add_special_tokens=False)["input_ids"]
                           + [tokenizer.eos_token_id]]
        checked += episode.turns > 1
    assert checked  # at least one multi-turn episode was checked


def test_an_episode_does_not_depend_on_the_others_in_its_call(tiny_tokenizer, factory):
    together, _ = run(tiny_tokenizer, factory, prompts_of(tiny_tokenizer, ["Say apple.", "Say apple now."]))
    alone, _ = run(tiny_tokenizer, factory, prompts_of(tiny_tokenizer, ["Say apple now."], first_index=1))
    assert together[1] == alone[0]


def test_budgets_end_episodes(tiny_tokenizer, factory):
    prompts = prompts_of(tiny_tokenizer, ["Say apple."])
    rollouts, _ = run(tiny_tokenizer, factory, prompts, max_turns=1)
    assert {r.episode.turns for r in rollouts[0].responses} == {1}
    assert {r.episode.end for r in rollouts[0].responses} <= {"done", "max_turns"}
    rollouts, _ = run(tiny_tokenizer, factory, prompts, max_episode_tokens=12)  # no room for a second turn
    assert {r.episode.end for r in rollouts[0].responses} <= {"done", "max_tokens"}
    assert all(len(r.token_ids) <= 12 for r in rollouts[0].responses)
    rollouts, _ = run(tiny_tokenizer, factory, prompts, engine=ScriptedEngine(tiny_tokenizer, "length"))
    assert {r.episode.end for r in rollouts[0].responses} <= {"done", "turn_cut"}
    assert all(r.episode.turns == 1 for r in rollouts[0].responses)


def test_a_reset_that_changed_since_the_prompts_were_made_is_refused(tiny_tokenizer, factory):
    prompts = [replace(prompts_of(tiny_tokenizer, ["Say apple."])[0], meta={"question": "Something else."})]
    with pytest.raises(UserError, match="reset gave other first messages"):
        run(tiny_tokenizer, factory, prompts)
