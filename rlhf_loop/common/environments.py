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

The factory (a class, or any callable without arguments) makes one environment per episode: the K episodes of a
prompt each get their own, reset with the same row. An environment must be deterministic given its row and the
assistant's messages (no clock, no unseeded randomness): a resumed run replays the episodes of an unfinished shard
and must get the same ones. A leaf module: the driver (first messages) and the rollout actors (steps) use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlhf_loop.common.errors import UserError
from rlhf_loop.common.records import Messages
from rlhf_loop.common.user_code import load_code_reference


@dataclass(frozen=True)
class Step:
    """The environment's answer to one assistant message."""

    messages: Messages = field(default_factory=list)  # its reply: user or tool turns (may be empty once done)
    done: bool = False  # the episode is over; no further assistant turn
    outcome: float | None = None  # the episode's outcome reward (read when done; the last one given counts)


class Environment(Protocol):
    def reset(self, row: dict[str, Any]) -> Messages:
        """Start an episode from a dataset row (every column); returns its first messages (system/user turns)."""
        ...

    def step(self, message: dict[str, str]) -> Step:
        """The assistant's message ({"role": "assistant", "content": ...}) -> the reply, done flag and outcome."""
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
    messages = environment.reset(row)
    if not (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
        raise UserError(f"environment {reference}: reset returned {messages!r:.80}; it must return a non-empty list of "
                        f"{{'role', 'content'}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def checked_step(step: Any, reference: str) -> Step:
    """A step's result, checked: a Step (or an object with its fields) whose messages are chat messages."""
    messages = getattr(step, "messages", None)
    if not isinstance(step, Step) and not hasattr(step, "done"):
        raise UserError(f"environment {reference}: step returned {type(step).__name__}; it must return "
                        f"rlhf_loop.common.environments.Step(messages, done, outcome)")
    if not (isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                               and isinstance(m.get("content"), str) for m in messages)):
        raise UserError(f"environment {reference}: step returned messages {messages!r:.80}; they must be a list of "
                        f"{{'role', 'content'}} messages")
    outcome = step.outcome
    if outcome is not None and not isinstance(outcome, (int, float)):
        raise UserError(f"environment {reference}: step returned outcome {outcome!r:.40}; it must be a number or None")
    if not step.done and not messages:
        raise UserError(f"environment {reference}: step returned no messages and done=False; reply, or end the episode")
    return Step([{"role": m["role"], "content": m["content"]} for m in messages], bool(step.done),
                None if outcome is None else float(outcome))
