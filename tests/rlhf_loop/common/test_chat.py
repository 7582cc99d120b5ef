"""Chat rendering: one way to turn messages into token ids (an environment's tools rendered by the template), the last
assistant turn cut by the template's mask where the template marks it with {% generation %}, else by the prompt
prefix, and a sampled turn parsed into a message by the tokenizer's response_template."""

from __future__ import annotations

import copy
import json

import pytest

from rlhf_loop.common.chat import (assistant_turn, chat_text, chat_token_ids, check_response_template,
                                   prompt_and_last_turn, sampled_message, tokens_after_turn)
from rlhf_loop.common.errors import UserError
from rlhf_loop.toy.tiny import LLAMA3_CHAT_TEMPLATE
from tests.tool_calls import CALCULATOR, tool_call_text, tool_tokenizer

# The toy template with the assistant's content and end-of-turn inside a generation block (as TRL's templates do).
MARKED_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture
def conversation(tiny_messages):
    return [*tiny_messages[1], assistant_turn("One two."), {"role": "user", "content": "Again."},
            assistant_turn("One two three.")]


def test_token_ids_are_the_template_text_without_added_special_tokens(tiny_tokenizer, tiny_messages):
    ids = chat_token_ids(tiny_tokenizer, tiny_messages[0], add_generation_prompt=True)
    assert ids == tiny_tokenizer.apply_chat_template(tiny_messages[0], add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
    assert ids.count(tiny_tokenizer.bos_token_id) == 1
    assert chat_text(tiny_tokenizer, tiny_messages[0], add_generation_prompt=True).endswith("<|end_header_id|>\n\n")


def test_without_a_generation_block_the_turn_follows_the_prompt(tiny_tokenizer, conversation):
    assert tiny_tokenizer.chat_template == LLAMA3_CHAT_TEMPLATE
    prompt, turn = prompt_and_last_turn(tiny_tokenizer, conversation)
    assert prompt == chat_token_ids(tiny_tokenizer, conversation[:-1], add_generation_prompt=True)
    assert tiny_tokenizer.decode(turn) == "One two three.<|eot_id|>"


def test_the_assistant_mask_cuts_the_same_last_turn(tiny_tokenizer, conversation):
    marked = copy.deepcopy(tiny_tokenizer)
    marked.chat_template = MARKED_TEMPLATE
    assert chat_token_ids(marked, conversation) == chat_token_ids(tiny_tokenizer, conversation)
    assert prompt_and_last_turn(marked, conversation) == prompt_and_last_turn(tiny_tokenizer, conversation)


def test_the_mask_serves_a_template_that_rewrites_earlier_turns(tiny_tokenizer, conversation):
    """A template that drops earlier assistant turns' content once the conversation ends with the assistant (as
    reasoning templates drop earlier thinking) renders the prompt differently once the last turn is added: only the
    mask can cut that turn out."""
    rewriting = MARKED_TEMPLATE.replace("message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}",
                                        "(message['content'] if loop.last or messages[-1]['role'] != 'assistant' else '')"
                                        " | trim + '<|eot_id|>' }}"
                                        "{% endgeneration %}")
    unmarked = rewriting.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    marked, plain = copy.deepcopy(tiny_tokenizer), copy.deepcopy(tiny_tokenizer)
    marked.chat_template, plain.chat_template = rewriting, unmarked
    with pytest.raises(ValueError, match="renders the prompt differently"):
        prompt_and_last_turn(plain, conversation)
    prompt, turn = prompt_and_last_turn(marked, conversation)
    assert marked.decode(turn) == "One two three.<|eot_id|>"
    assert prompt + turn == chat_token_ids(marked, conversation)


QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
CALL = {"type": "function", "function": {"name": "calculator", "arguments": {"a": 2, "b": 3, "operation": "add"}}}


def sampled(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_tools_are_rendered_by_the_template_in_its_own_format(tiny_tokenizer):
    tokenizer = tool_tokenizer(tiny_tokenizer)
    with_tools = chat_text(tokenizer, QUESTION, add_generation_prompt=True, tools=[CALCULATOR])
    assert json.dumps(CALCULATOR) in with_tools and "Tools:" not in chat_text(tokenizer, QUESTION, True)
    assert chat_token_ids(tokenizer, QUESTION, add_generation_prompt=True, tools=[CALCULATOR]) == (
        tokenizer.apply_chat_template(QUESTION, tools=[CALCULATOR], add_generation_prompt=True, tokenize=True,
                                      return_dict=False))


def test_a_sampled_tool_call_is_parsed_by_the_response_template(tiny_tokenizer):
    tokenizer = tool_tokenizer(tiny_tokenizer)
    context = chat_token_ids(tokenizer, QUESTION, add_generation_prompt=True, tools=[CALCULATOR])
    text = tool_call_text()
    assert sampled_message(tokenizer, sampled(tokenizer, text), context, text, [CALCULATOR]) == {
        "role": "assistant", "content": "Let me compute.", "tool_calls": [CALL]}
    answer = sampled_message(tokenizer, sampled(tokenizer, "It is 5."), context, "It is 5.", [CALCULATOR])
    assert answer == {"role": "assistant", "content": "It is 5."}


def test_tool_call_arguments_are_cast_by_the_tools_schemas(tiny_tokenizer):
    tokenizer = tool_tokenizer(tiny_tokenizer)
    text = tool_call_text('{"a": "2", "b": "3", "operation": "add"}', before="")
    cast = sampled_message(tokenizer, sampled(tokenizer, text), [], text, [CALCULATOR])
    assert cast == {"role": "assistant", "content": "", "tool_calls": [CALL]}  # content always there, a string
    as_written = sampled_message(tokenizer, sampled(tokenizer, text), [], text)
    assert as_written["tool_calls"][0]["function"]["arguments"] == {"a": "2", "b": "3", "operation": "add"}


def test_without_a_response_template_or_a_parse_the_text_is_the_content(tiny_tokenizer):
    text = tool_call_text()
    plain = tool_tokenizer(tiny_tokenizer, response_template=None)
    assert sampled_message(plain, sampled(plain, text), [], text, [CALCULATOR]) == assistant_turn(text)
    malformed = tool_call_text('{"a": 2, "b": 3, "operation": add}')  # the policy's JSON does not parse
    parsing = tool_tokenizer(tiny_tokenizer)
    assert sampled_message(parsing, sampled(parsing, malformed), [], malformed, [CALCULATOR]) == (
        assistant_turn(malformed))


def test_a_malformed_response_template_is_refused_in_one_line(tiny_tokenizer):
    check_response_template(tool_tokenizer(tiny_tokenizer))
    check_response_template(tiny_tokenizer)  # none: nothing to check
    broken = tool_tokenizer(tiny_tokenizer, response_template={"fields": {"content": {"content": "text"}}})
    with pytest.raises(UserError, match=r"response_template is malformed \(.*start_anchor"):
        check_response_template(broken)


def test_after_a_tool_call_come_the_templates_tool_turn_and_generation_prompt(tiny_tokenizer):
    tokenizer = tool_tokenizer(tiny_tokenizer)
    conversation = [*QUESTION, {"role": "assistant", "content": "Let me compute.", "tool_calls": [CALL]}]
    reply = [{"role": "tool", "name": "calculator", "content": "5"}]
    following = tokens_after_turn(tokenizer, conversation, reply, sampled(tokenizer, tool_call_text()), [CALCULATOR])
    assert tokenizer.decode(following) == ('<|start_header_id|>tool<|end_header_id|>\n\n<tool_response '
                                           'name="calculator">5</tool_response><|eot_id|>'
                                           '<|start_header_id|>assistant<|end_header_id|>\n\n')
    with pytest.raises(ValueError, match="cannot render the reply .*a tool turn needs the name of its tool"):
        tokens_after_turn(tokenizer, conversation, [{"role": "tool", "content": "5"}],
                          sampled(tokenizer, tool_call_text()), [CALCULATOR])
