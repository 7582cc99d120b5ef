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
    return [
        ResponseToScore(q, r, query.messages, response, query.meta)
        for q, query in enumerate(queries)
        for r, response in enumerate(query.responses)
    ]


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
