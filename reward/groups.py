"""Pointwise scorers see samples, the seam speaks in groups (one prompt, K responses): ungroup and regroup."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from reward.base import RewardQuery, RewardResult
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.records import Messages


@dataclass(frozen=True)
class ResponseToScore:
    query_index: int  # which query of the call
    response_index: int  # which of its responses
    messages: Messages
    response: str
    meta: dict[str, Any]


def ungroup(queries: Sequence[RewardQuery]) -> list[ResponseToScore]:
    """One sample per response; an episode's is its whole conversation up to its last assistant turn, which is
    the response (the environment's final reply after it is left out: the policy never answered it)."""
    return [
        ResponseToScore(q, r, *_conversation(query, r))
        for q, query in enumerate(queries)
        for r in range(len(query.responses))
    ]


def _conversation(query: RewardQuery, r: int) -> tuple[Messages, str, dict[str, Any]]:
    if not query.episodes:
        return query.messages, query.responses[r], query.meta
    turns = query.episodes[r].answered_turns()
    return [*query.messages, *turns[:-1]], turns[-1]["content"], query.meta


def refuse_episodes(queries: Sequence[RewardQuery], kind: str) -> None:
    """Kinds that compare or send responses against one shared prompt cannot score episodes (each has its own turns)."""
    if any(query.episodes for query in queries):
        raise UserError(f"reward kind {kind} scores single-turn responses; score episodes with kind outcome, a "
                        f"pointwise model (bradley_terry, armorm), a function, or a combination of them")


def regroup(
    queries: Sequence[RewardQuery], scores: Sequence[float], objectives: dict[str, Sequence[float]] | None = None
) -> list[RewardResult]:
    """Cut flat per-sample scores (and per-objective scores) back into one result per query."""
    results, start = [], 0
    for query in queries:
        end = start + len(query.responses)
        results.append(RewardResult(
            scores=[float(s) for s in scores[start:end]],
            objectives={name: [float(v) for v in values[start:end]] for name, values in (objectives or {}).items()},
        ))
        start = end
    return results


def describe(sample: ResponseToScore) -> str:
    """Names a sample in an error message so the user can find it."""
    prompt = sample.messages[-1]["content"] if sample.messages else ""
    return (f"query {sample.query_index} response {sample.response_index} "
            f"(prompt {_clip(prompt)}, response {_clip(sample.response)})")


def _clip(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_finite(scores: Sequence[float], name_of: Callable[[int], str], source: str) -> None:
    """NaN or infinite scores would silently poison pair selection: stop and name the sample instead."""
    for index, score in enumerate(scores):
        if not math.isfinite(score):
            raise UserError(f"{source} returned {score} for {name_of(index)}; a reward must be a finite number")
