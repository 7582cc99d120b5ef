"""The environment seam: multi-turn rollouts, where the policy's every turn gets a reply until the episode ends.

    # my_env.py, anywhere on disk                    environment: {factory: my_env.py:GuessTheNumber}
    class GuessTheNumber:
        def reset(self, row):                        # the dataset row -> the episode's first messages
            self.secret = row["secret"]
            return [{"role": "user", "content": "Guess my number between 1 and 10."}]

        def step(self, message):                     # the assistant's message -> the environment's reply
            guess = message["content"].strip()
            if guess == str(self.secret):
                return Step([], done=True, outcome=1.0)
            return Step([{"role": "user", "content": "Higher." if ... else "Lower."}])

An environment that offers tools gives them as its `tools` attribute (read after reset, so it may depend on the
row): JSON-schema tool definitions, as `tokenizer.apply_chat_template(..., tools=...)` takes them. Every rendering of
its episodes passes them, so the chat template writes them in its own format; where the policy tokenizer has a
`response_template`, the assistant's message reaches `step` parsed by it (content, tool_calls), and the reply may hold
tool turns ({"role": "tool", "content": ..., plus the keys the template needs, such as name or tool_call_id}).

The factory (a class, or any callable without arguments) makes one environment per episode: the K episodes of a
prompt each get their own, reset with the same row. An environment must be deterministic given its row and the
assistant's messages (no clock, no unseeded randomness): a resumed run replays the episodes of an unfinished shard
and must get the same ones. A leaf module: the driver (first messages) and the rollout actors (steps) use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlhf_loop.common.errors import UserError
from rlhf_loop.common.records import Messages
from rlhf_loop.common.user_code import load_code_reference

# what environments' messages must be, as errors say it
MESSAGE_SHAPE = ("{'role', 'content'} messages (both strings; other keys, such as a tool turn's name or "
                 "tool_call_id, JSON values)")


@dataclass(frozen=True)
class Step:
    """The environment's answer to one assistant message."""

    messages: Messages = field(default_factory=list)  # its reply: user or tool turns (may be empty once done)
    done: bool = False  # the episode is over; no further assistant turn
    outcome: float | None = None  # the episode's outcome reward (read when done; the last one given counts)


class Environment(Protocol):
    """Optionally also `tools`: a list of JSON-schema tool definitions (see the module's docstring)."""

    def reset(self, row: dict[str, Any]) -> Messages:
        """Start an episode from a dataset row (every column); returns its first messages (system/user turns)."""
        ...

    def step(self, message: dict[str, Any]) -> Step:
        """The assistant's message ({"role": "assistant", "content": ...}, plus "tool_calls" and whatever else the
        tokenizer's response_template parses) -> the reply, done flag and outcome."""
        ...


EnvironmentFactory = Callable[[], Environment]


def load_environment(reference: str, key: str = "environment.factory") -> EnvironmentFactory:
    """The factory named by "file.py:Name" or "package.module:Name", checked to make environments that reset and
    step; errors name `key`."""
    factory = load_code_reference(reference, key)
    if not callable(factory):
        raise UserError(f"{key} {reference!r} is not callable; name a class (or a function) that makes an environment")
    missing = [method for method in ("reset", "step") if not callable(getattr(factory, method, None))]
    if isinstance(factory, type) and missing:
        raise UserError(f"{key} {reference!r} has no {' or '.join(missing)} method; an environment needs "
                        f"reset(row) -> messages and step(message) -> Step")
    return factory


def first_messages(environment: Environment, row: dict[str, Any], reference: str) -> Messages:
    """`environment.reset(row)`, checked to be chat messages; errors name the environment."""
    returned = environment.reset(row)
    messages = _chat_messages(returned)
    if not messages:
        raise UserError(f"environment {reference}: reset returned {returned!r:.80}; it must return a non-empty list "
                        f"of {MESSAGE_SHAPE}")
    return messages


def environment_tools(environment: Environment, reference: str) -> list[dict[str, Any]] | None:
    """The environment's `tools` (read after reset), checked to be tool definitions; None where it offers none."""
    tools = getattr(environment, "tools", None)
    if tools is None or tools == []:
        return None
    named = isinstance(tools, list) and all(
        isinstance(tool, dict) and isinstance(tool.get("function", tool), dict)
        and isinstance(tool.get("function", tool).get("name"), str) for tool in tools)
    copied = _json_copy(tools) if named else None
    if copied is None:
        raise UserError(f"environment {reference}: tools is {tools!r:.80}; it must be a list of JSON-schema tool "
                        f"definitions such as {{'type': 'function', 'function': {{'name', 'description', "
                        f"'parameters'}}}}")
    return copied


def checked_step(step: Any, reference: str) -> Step:
    """A step's result, checked: a Step (or an object with its fields) whose messages are chat messages."""
    if not isinstance(step, Step) and not hasattr(step, "done"):
        raise UserError(f"environment {reference}: step returned {type(step).__name__}; it must return "
                        f"rlhf_loop.common.environments.Step(messages, done, outcome)")
    returned = getattr(step, "messages", None)
    messages = _chat_messages(returned)
    if messages is None:
        raise UserError(f"environment {reference}: step returned messages {returned!r:.80}; they must be a list of "
                        f"{MESSAGE_SHAPE}")
    outcome = step.outcome
    if outcome is not None and not isinstance(outcome, (int, float)):
        raise UserError(f"environment {reference}: step returned outcome {outcome!r:.40}; it must be a number or None")
    if not step.done and not messages:
        raise UserError(f"environment {reference}: step returned no messages and done=False; reply, or end the episode")
    return Step(messages, bool(step.done), None if outcome is None else float(outcome))


def _chat_messages(value: Any) -> Messages | None:
    """A copy of `value` where it is a list of chat messages (MESSAGE_SHAPE); None where it is not. The copy keeps
    the environment from changing what the episode recorded. Keys set to None are left out: a `datasets` row fills
    every message with every key any message has, and templates test for a key with `is defined`."""
    if not (isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                            and isinstance(m.get("content"), str) for m in value)):
        return None
    return _json_copy([{key: item for key, item in m.items() if item is not None} for m in value])


def _json_copy(value: Any) -> Any:
    """A deep copy through JSON, the form records are written in; None where `value` is not JSON data."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        return None
