"""Typed records that flow between the stages of an iteration.

prompts -> Rollout (K responses each) -> Scored -> Pair -> learner.
With an environment (`rlhf_loop.common.environments`) a response is a whole episode: its `episode` holds the turns.
Every record round-trips through JSON (`to_json` / `from_json`) because each stage leaves its output in the run
directory, and `policy/` and `reward/` use these types without importing the loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, Any]]  # chat messages: role and content strings, maybe more (tool_calls, name, ...)


@dataclass(frozen=True)
class Prompt:
    """One prompt of an iteration, rendered with the policy's chat template."""

    index: int  # position in the iteration's prompt list: the stable id used for shards and seeds
    messages: Messages  # the conversation so far (system/user turns), as chat messages
    token_ids: list[int]  # the messages rendered by the policy tokenizer, generation prompt appended
    meta: dict[str, Any] = field(default_factory=dict)  # the dataset row's other columns (answers, labels, ...)
    tools: list[dict[str, Any]] | None = None  # an environment's tool definitions, rendered into token_ids


EPISODE_ENDS = ("done", "max_turns", "max_tokens", "turn_cut")  # why an episode ended; see Episode.end


@dataclass(frozen=True)
class Episode:
    """A multi-turn response: the assistant's turns and the environment's replies after the prompt."""

    messages: Messages  # every turn after the prompt, in order: assistant, environment (user/tool), assistant, ...
    # one per token of Response.token_ids: 1 where the policy sampled it (the loss counts it), 0 where the chat
    # template or the environment wrote it (an assistant turn's closing tokens, the replies, generation prompts)
    loss_mask: list[int]
    turns: int  # assistant turns
    # done: the environment ended it; max_turns / max_tokens: environment.max_turns or max_episode_tokens left no
    # room for another turn; turn_cut: an assistant turn hit rollout.max_tokens, so the episode stops there
    end: str
    outcome: float | None = None  # the environment's outcome reward, when it gave one

    def answered_turns(self) -> Messages:
        """The turns up to the last assistant turn: what the policy answered (a final reply after it, never
        answered, is left out); what reward models score and exported pairs hold."""
        last = max(i for i, message in enumerate(self.messages) if message["role"] == "assistant")
        return self.messages[:last + 1]


@dataclass(frozen=True)
class Response:
    """One sampled continuation of a prompt; with an environment, a whole episode."""

    text: str  # the response; of an episode, its last assistant turn
    # exactly the sampled tokens (EOS included when it stopped), so DPO trains on them; of an episode, every token
    # after the prompt, the environment's included (see Episode.loss_mask)
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string; an episode the environment ended) or "length" (cut short)
    episode: Episode | None = None  # the turns, when an environment drove the rollout

    @property
    def loss_mask(self) -> list[int] | None:
        """1 per token the loss counts (the policy's own), None when all of them do."""
        return self.episode.loss_mask if self.episode is not None else None

    @property
    def sampled_tokens(self) -> int:
        """How many of its tokens the policy sampled (of an episode: its turns, not the environment's)."""
        return len(self.token_ids) if self.episode is None else sum(self.episode.loss_mask)


@dataclass(frozen=True)
class Rollout:
    """The K responses sampled for one prompt."""

    prompt: Prompt
    responses: list[Response]
    policy_version: int = 0  # the iteration whose trained weights sampled it (0: pi_0); see rollout.max_staleness
    # optimizer steps of the sampling iteration itself those weights had taken: 0, but under train.sync_every_steps
    # (semi-online) the engines get the learner's weights within an iteration, every s steps
    policy_step: int = 0


@dataclass(frozen=True)
class Scored:
    """Reward-model scores for the K responses of one rollout, in the same order."""

    rollout: Rollout
    scores: list[float]  # what pairs are built from: after reward.length_penalty
    objectives: dict[str, list[float]] = field(default_factory=dict)  # per-objective scores, e.g. ArmoRM's
    raw_scores: list[float] = field(default_factory=list)  # the reward model's, before the length penalty


@dataclass(frozen=True)
class Pair:
    """A preference pair for DPO: same prompt, chosen preferred over rejected."""

    prompt_index: int
    prompt_messages: Messages
    prompt_token_ids: list[int]
    chosen: Response
    rejected: Response
    chosen_score: float
    rejected_score: float
    policy_version: int = 0  # the iteration whose trained weights sampled both responses (0: pi_0)
    policy_step: int = 0  # and the optimizer steps of the sampling iteration they had taken (see Rollout)


def to_json(record: Any) -> dict[str, Any]:
    """A record as plain JSON-able data."""
    return dataclasses.asdict(record)


def prompt_from_json(data: dict[str, Any]) -> Prompt:
    return Prompt(**data)


def response_from_json(data: dict[str, Any]) -> Response:
    episode = data.get("episode")
    return Response(**{**data, "episode": Episode(**episode) if episode is not None else None})


def rollout_from_json(data: dict[str, Any]) -> Rollout:
    return Rollout(
        prompt=prompt_from_json(data["prompt"]),
        responses=[response_from_json(r) for r in data["responses"]],
        policy_version=data.get("policy_version", 0),
        policy_step=data.get("policy_step", 0),
    )


def scored_from_json(data: dict[str, Any]) -> Scored:
    return Scored(
        rollout=rollout_from_json(data["rollout"]),
        scores=list(data["scores"]),
        objectives={k: list(v) for k, v in data.get("objectives", {}).items()},
        raw_scores=list(data.get("raw_scores", data["scores"])),
    )


def pair_from_json(data: dict[str, Any]) -> Pair:
    return Pair(
        prompt_index=data["prompt_index"],
        prompt_messages=data["prompt_messages"],
        prompt_token_ids=data["prompt_token_ids"],
        chosen=response_from_json(data["chosen"]),
        rejected=response_from_json(data["rejected"]),
        chosen_score=data["chosen_score"],
        rejected_score=data["rejected_score"],
        policy_version=data.get("policy_version", 0),
        policy_step=data.get("policy_step", 0),
    )
