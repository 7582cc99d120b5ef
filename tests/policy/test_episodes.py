"""Episodes in a rollout engine: K per prompt, turn by turn, all live episodes of a call batched per turn; their
tokens are exactly the conversation the chat template renders, with the loss mask on the policy's tokens only
(checked token by token against transformers' assistant mask of a template that marks assistant turns); tool calls
in the template's own format, parsed by the tokenizer's response_template."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from policy.config import EnvironmentConfig
from policy.episodes import EpisodeRunner
from policy.rollout_protocol import Sampling
from rlhf_loop.common.chat import assistant_turn, chat_token_ids
from rlhf_loop.common.environments import load_environment
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.records import Prompt, Response, Rollout
from rlhf_loop.common.seeds import derived_seed
from tests.rlhf_loop.common.test_chat import MARKED_TEMPLATE
from tests.tool_calls import CALCULATOR, ENVIRONMENT as CALCULATOR_ENVIRONMENT, tool_call_text, tool_tokenizer

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


# ---- tool calls ------------------------------------------------------------------------------------------------------

class CalculatorEngine:
    """Samples `call` (a calculator call) until the context holds a tool's reply, then the answer."""

    def __init__(self, tokenizer, call: str = tool_call_text()):
        self.tokenizer, self.call = tokenizer, call

    def generate(self, prompts, sampling):
        rollouts = []
        for prompt in prompts:
            text = "It is 5." if "<tool_response" in self.tokenizer.decode(prompt.token_ids) else self.call
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rollouts.append(Rollout(prompt, [Response(text, ids, "stop")]))
        return rollouts


@pytest.fixture
def calculator(tmp_path):
    path = tmp_path / "calculator.py"
    path.write_text(CALCULATOR_ENVIRONMENT)
    return lambda name="Calculator": f"{path}:{name}"


def sum_prompt(tokenizer, tools=(CALCULATOR,)):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    tools = list(tools) or None
    return Prompt(0, messages, chat_token_ids(tokenizer, messages, add_generation_prompt=True, tools=tools),
                  {"a": 2, "b": 3}, tools)


def test_a_tool_call_is_parsed_stepped_and_answered_in_the_templates_format(tiny_tokenizer, calculator):
    """Token by token: the prompt renders the tools, the sampled call reaches step() as tool_calls, the tool's reply
    follows as the template's tool turn, and the loss mask is transformers' assistant mask of the conversation."""
    tokenizer = tool_tokenizer(tiny_tokenizer)
    prompt = sum_prompt(tokenizer)
    assert '{"name": "calculator", "description": "Adds or multiplies two integers."' in tokenizer.decode(
        prompt.token_ids)
    rollouts, _ = run(tokenizer, calculator(), [prompt], replace(SAMPLING, n=2), engine=CalculatorEngine(tokenizer))
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"a": 2, "b": 3, "operation": "add"}}}
    parsed = {"role": "assistant", "content": "Let me compute.", "tool_calls": [call]}
    seen = load_environment(calculator()).seen
    assert seen == [parsed, parsed, assistant_turn("It is 5."), assistant_turn("It is 5.")]  # both episodes' turns
    oracle_tokenizer = tool_tokenizer(tiny_tokenizer, marked=True)
    for response in rollouts[0].responses:
        episode = response.episode
        assert episode.messages == [parsed, {"role": "tool", "name": "calculator", "content": "5"},
                                    assistant_turn("It is 5.")]
        assert (episode.turns, episode.end, episode.outcome, response.text) == (2, "done", 1.0, "It is 5.")
        oracle = oracle_tokenizer.apply_chat_template([*prompt.messages, *episode.messages], tools=[CALCULATOR],
                                                      tokenize=True, return_dict=True,
                                                      return_assistant_tokens_mask=True)
        assert prompt.token_ids + response.token_ids == list(oracle["input_ids"])
        assert episode.loss_mask == list(oracle["assistant_masks"])[len(prompt.token_ids):]
        between = [token for token, mask in zip(response.token_ids, episode.loss_mask) if not mask]
        assert tokenizer.decode(between) == ('<|start_header_id|>tool<|end_header_id|>\n\n<tool_response '
                                             'name="calculator">5</tool_response><|eot_id|>'
                                             '<|start_header_id|>assistant<|end_header_id|>\n\n')


def test_the_sampled_call_keeps_its_tokens_where_the_template_would_write_it_otherwise(tiny_tokenizer, calculator):
    """A call written unlike the template (a newline before it, its integers quoted) is parsed and cast for step(),
    but the episode keeps the sampled tokens: the loss counts exactly them, never a re-rendering."""
    tokenizer = tool_tokenizer(tiny_tokenizer)
    call = tool_call_text('{"a": "2", "b": "3", "operation": "add"}', before="Let me compute.\n")
    prompt = sum_prompt(tokenizer)
    rollouts, _ = run(tokenizer, calculator(), [prompt], replace(SAMPLING, n=1),
                      engine=CalculatorEngine(tokenizer, call))
    response = rollouts[0].responses[0]
    episode = response.episode
    assert episode.messages[0]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 3, "operation": "add"}
    assert episode.messages[1]["content"] == "5" and episode.outcome == 1.0  # cast to integers: 2 + 3, not "2" "3"
    sampled = [token for token, mask in zip(response.token_ids, episode.loss_mask) if mask]
    assert sampled == [token for text in (call, "It is 5.")
                       for token in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    rendered = chat_token_ids(tokenizer, [*prompt.messages, *episode.messages], tools=[CALCULATOR])
    assert prompt.token_ids + response.token_ids != rendered  # the template would have written the call otherwise


def test_without_a_response_template_the_environment_gets_the_text(tiny_tokenizer, calculator):
    tokenizer = tool_tokenizer(tiny_tokenizer, response_template=None)
    rollouts, _ = run(tokenizer, calculator(), [sum_prompt(tokenizer)], replace(SAMPLING, n=1),
                      engine=CalculatorEngine(tokenizer))
    assert load_environment(calculator()).seen == [assistant_turn(tool_call_text())]
    episode = rollouts[0].responses[0].episode  # no tool_calls: the calculator took the text for an answer
    assert (episode.turns, episode.end, episode.outcome) == (1, "done", 0.0)


@pytest.mark.parametrize("environment, message", [
    ("NamelessCalculator", r"environment .*:NamelessCalculator: the chat template cannot render the reply .*a tool "
                           r"turn needs the name of its tool"),
    ("NumberCalculator", r"environment .*:NumberCalculator: step returned messages .*; they must be a list of "
                         r"\{'role', 'content'\} messages"),
])
def test_malformed_tool_turns_are_one_line_errors(tiny_tokenizer, calculator, environment, message):
    tokenizer = tool_tokenizer(tiny_tokenizer)
    with pytest.raises(UserError, match=message) as error:
        run(tokenizer, calculator(environment), [sum_prompt(tokenizer)], replace(SAMPLING, n=1),
            engine=CalculatorEngine(tokenizer))
    assert "\n" not in str(error.value)


def test_tools_that_changed_since_the_prompts_were_made_are_refused(tiny_tokenizer, calculator):
    tokenizer = tool_tokenizer(tiny_tokenizer)
    with pytest.raises(UserError, match="reset gave other first messages or tools for prompt 0"):
        run(tokenizer, calculator(), [sum_prompt(tokenizer, tools=())], engine=CalculatorEngine(tokenizer))
