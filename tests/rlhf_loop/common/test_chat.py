"""Chat rendering: one way to turn messages into token ids, and the last assistant turn cut by the template's mask
where the template marks it with {% generation %}, else by the prompt prefix."""

from __future__ import annotations

import copy

import pytest

from rlhf_loop.common.chat import assistant_turn, chat_text, chat_token_ids, prompt_and_last_turn
from rlhf_loop.toy.tiny import LLAMA3_CHAT_TEMPLATE

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
