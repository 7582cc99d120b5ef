"""Tool calls on the tiny tokenizer: a chat template that writes tools and tool calls in its own format (Hermes-like:
<tool_call>{json}</tool_call> in the assistant's turn, <tool_response> in a tool turn), the response_template that
parses it back, and an environment with a calculator tool. Shared by the chat, environment, data and episode tests."""

from __future__ import annotations

import copy

# Tools in a system turn, tool calls after the assistant's content, each tool reply in a turn of its own that names
# its tool (refused without one, as templates that need a key do). The assistant's turns are in {% generation %}
# blocks, so transformers' assistant mask (the tests' oracle) marks them; TOOL_TEMPLATE is the same without.
MARKED_TOOL_TEMPLATE = (
    "{% macro body(message) %}{{ message['content'] }}{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson) + "
    "'</tool_call>' }}{% endfor %}{{ '<|eot_id|>' }}{% endmacro %}"
    "{{ bos_token }}"
    "{% if tools %}{{ '<|start_header_id|>system<|end_header_id|>\n\nTools:' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\nCall one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}"
    "{% if message['name'] is not defined %}{{ raise_exception('a tool turn needs the name of its tool') }}{% endif %}"
    "{{ '<|start_header_id|>tool<|end_header_id|>\n\n<tool_response name=\"' + message['name'] + '\">' + "
    "message['content'] + '</tool_response><|eot_id|>' }}"
    "{% else %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ body(message) }}{% endgeneration %}"
    "{% else %}{{ body(message) }}{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TOOL_TEMPLATE = MARKED_TOOL_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")

# transformers' declarative parser of that format: JSON between <tool_call> tags becomes tool_calls, the rest content.
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "fields": {
        "tool_calls": {"open_pattern": r"\s*<tool_call>", "close": "</tool_call>", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"\s*<\|eot_id\|>", "content": "text"},
    },
}

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Adds or multiplies two integers.",
    "parameters": {"type": "object", "required": ["a", "b", "operation"], "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"},
        "operation": {"type": "string", "enum": ["add", "multiply"]},
    }},
}}

# Asks for a sum; a tool call gets the calculator's result as a tool turn, an answer ends the episode (outcome 1 when
# it holds the sum). `Calculator.seen` keeps every message step got, for the tests to read. Two broken variants
# reply with malformed tool turns.
ENVIRONMENT = f'''
from rlhf_loop.common.environments import Step

class Calculator:
    tools = [{CALCULATOR!r}]
    seen = []

    def reset(self, row):
        self.a, self.b = row["a"], row["b"]
        return [{{"role": "user", "content": f"What is {{self.a}} + {{self.b}}?"}}]

    def step(self, message):
        Calculator.seen.append(message)
        replies = []
        for call in message.get("tool_calls", []):
            a, b, operation = (call["function"]["arguments"][key] for key in ("a", "b", "operation"))
            result = a + b if operation == "add" else a * b
            replies.append({{"role": "tool", "name": "calculator", "content": str(result)}})
        if replies:
            return Step(replies)
        return Step(done=True, outcome=float(str(self.a + self.b) in message["content"]))

class NamelessCalculator(Calculator):
    """Its tool turns lack the name the template needs."""
    def step(self, message):
        step = super().step(message)
        return Step([{{"role": m["role"], "content": m["content"]}} for m in step.messages], step.done, step.outcome)

class NumberCalculator(Calculator):
    """Its tool turns hold the result as a number, not a string."""
    def step(self, message):
        step = super().step(message)
        return Step([{{**m, "content": int(m["content"])}} for m in step.messages], step.done, step.outcome)
'''


def tool_call_text(arguments: str = '{"a": 2, "b": 3, "operation": "add"}', before: str = "Let me compute.") -> str:
    """An assistant turn that calls the calculator, written as the template writes it (by default)."""
    return f'{before}<tool_call>{{"name": "calculator", "arguments": {arguments}}}</tool_call>'


def tool_tokenizer(tiny_tokenizer, response_template: dict | None = RESPONSE_TEMPLATE, marked: bool = False):
    """The tiny tokenizer with the tool template and (unless None) the response_template."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = MARKED_TOOL_TEMPLATE if marked else TOOL_TEMPLATE
    tokenizer.response_template = copy.deepcopy(response_template)
    return tokenizer
