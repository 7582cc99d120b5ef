"""Chat rendering: every role turns messages into token ids the same way, with the tokenizer's own chat template.

    chat_token_ids(tokenizer, messages, add_generation_prompt=True)     # a prompt, as the rollout engines see it
    chat_token_ids(tokenizer, [*messages, assistant_turn(response)])   # a scored conversation
    prompt_and_last_turn(tokenizer, conversation)                       # SFT and preference pairs: (prompt, turn)
    tokens_after_turn(tokenizer, conversation, replies, sampled_ids)    # episodes: what follows a sampled turn
    sampled_message(tokenizer, sampled_ids, context_ids, text)           # episodes: a sampled turn as a message

The template's text is tokenized without adding special tokens: the template writes BOS itself. `tools` (an
environment's JSON-schema tool definitions) go to the template, which renders them in its own format.
"""

from __future__ import annotations

import re
from typing import Any

from jinja2 import TemplateError

from rlhf_loop.common.errors import UserError
from rlhf_loop.common.records import Messages

# `{% generation %}...{% endgeneration %}` marks the assistant's tokens; transformers then returns their mask.
_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


def assistant_turn(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def chat_text(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False,
              tools: list[dict[str, Any]] | None = None) -> str:
    with_tools = {"tools": tools} if tools else {}  # only where there are some: not every tokenizer takes the key
    return tokenizer.apply_chat_template(messages, **with_tools, add_generation_prompt=add_generation_prompt,
                                         tokenize=False)


def chat_token_ids(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False,
                   tools: list[dict[str, Any]] | None = None) -> list[int]:
    return tokenizer(chat_text(tokenizer, messages, add_generation_prompt, tools),
                     add_special_tokens=False)["input_ids"]


def prompt_and_last_turn(tokenizer: Any, messages: Messages) -> tuple[list[int], list[int]]:
    """(prompt ids, ids of the final assistant turn to its end, end-of-turn tokens included) of a conversation.

    Where the template marks assistant turns with `{% generation %}` (and the tokenizer is fast, which the mask
    needs), transformers' assistant mask says where the last turn starts. Most templates (Llama 3, Qwen, the toy's)
    have no such block, so the fallback cuts the conversation after the prompt rendered with its generation prompt;
    that needs the template to render the earlier turns the same way once the last one is added. The caller has
    checked that the last turn is the assistant's."""
    split = _split_by_assistant_mask(tokenizer, messages)
    if split is not None:
        return split
    prompt = chat_token_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full = chat_token_ids(tokenizer, messages)
    if full[: len(prompt)] != prompt:
        raise ValueError(
            "the chat template renders the prompt differently once the assistant turn is added, so the turn cannot "
            "be cut out of the conversation; give SFTExample(prompt_token_ids, response_token_ids) instead"
        )
    return prompt, full[len(prompt):]


def _split_by_assistant_mask(tokenizer: Any, messages: Messages) -> tuple[list[int], list[int]] | None:
    """Cut before the last `{% generation %}` span; None where the template or tokenizer gives no mask."""
    template = getattr(tokenizer, "chat_template", None)
    if not (isinstance(template, str) and _GENERATION_BLOCK.search(template) and tokenizer.is_fast):
        return None
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    full, mask = list(rendered["input_ids"]), list(rendered["assistant_masks"])
    if 1 not in mask:
        return None
    start = len(mask) - 1 - mask[::-1].index(1)  # the last masked token, then back to the start of its span
    while start > 0 and mask[start - 1]:
        start -= 1
    return full[:start], full[start:]


def tokens_after_turn(tokenizer: Any, conversation: Messages, replies: Messages, sampled: list[int],
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The tokens that follow an assistant turn's sampled tokens in an episode: the rest of the turn's closing as the
    template writes it (e.g. ChatML's newline after <|im_end|>), then `replies` and the next generation prompt.

    `conversation` ends with that assistant turn; `sampled` are its sampled ids, ending with the token the policy
    stopped on. Rendering whole conversations and taking differences keeps the sampled ids as they are (no
    re-tokenisation of the model's text), so an episode's tokens are exactly the contexts its turns were sampled
    from; it needs the template to render earlier turns the same way once later ones are added (Llama 3, ChatML,
    the toy's do). None of these tokens were sampled: an episode's loss mask is 0 on them. The assistant turn may be
    a parsed one (content and tool_calls): its rendering serves only to find its closing tokens."""
    try:
        before = chat_token_ids(tokenizer, conversation[:-1], add_generation_prompt=True, tools=tools)
        closed = chat_token_ids(tokenizer, conversation, tools=tools)
        after = chat_token_ids(tokenizer, [*conversation, *replies], add_generation_prompt=True, tools=tools)
    except TemplateError as e:  # e.g. a tool turn without a key the template reads
        raise ValueError(f"the chat template cannot render the reply {replies!r:.120}: {e}; give its messages the "
                         f"keys the template reads") from None
    if closed[:len(before)] != before or after[:len(closed)] != closed:
        raise ValueError("the chat template renders earlier turns differently once a later turn is added, so an "
                         "episode's turns cannot be appended to its tokens; use a template that renders each turn on "
                         "its own (Llama 3, ChatML)")
    turn = closed[len(before):]  # the assistant turn as the template writes it, its closing tokens included
    stop = sampled[-1] if sampled else None
    if stop not in turn:
        raise ValueError(f"the chat template does not close an assistant turn with token {stop} that the policy "
                         f"stopped on; its turn renders as {turn[-4:]} at the end")
    closing = turn[len(turn) - turn[::-1].index(stop):]
    return closing + after[len(closed):]


def check_response_template(tokenizer: Any) -> None:
    """Refuse a tokenizer whose response_template (the declarative parser of its chat format that transformers
    reads from tokenizer_config.json) is malformed, before any turn is parsed with it."""
    from transformers.utils.chat_parsing import ResponseParser

    template = getattr(tokenizer, "response_template", None)
    if template is None:
        return
    try:
        ResponseParser(template, prefix="")
    except (TypeError, ValueError) as e:
        raise UserError(f"the policy tokenizer's response_template is malformed ({e}); fix or remove it in its "
                        f"tokenizer_config.json") from None


def sampled_message(tokenizer: Any, sampled: list[int], context: list[int], text: str,
                    tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A sampled assistant turn as a message. Where the tokenizer has a response_template, the turn's tokens
    (decoded with their special tokens, which mark tool calls in some formats) are parsed by it after `context`,
    the ids the turn was sampled after: content, tool_calls and whatever else the template defines, tool-call
    arguments cast by the `tools` schemas. Without one, or where the turn does not parse (a tool call's JSON the
    policy malformed), the message is `text` as content."""
    if getattr(tokenizer, "response_template", None) is None:
        return assistant_turn(text)
    try:
        parsed = tokenizer.parse_response(tokenizer.decode(sampled), prefix=tokenizer.decode(context), tools=tools)
    except ValueError:
        return assistant_turn(text)
    return {"role": "assistant", "content": "", **parsed}  # content always there, a string, as in every message
