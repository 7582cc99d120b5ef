"""The reward seam: score the K responses of each prompt.

Scoring takes whole groups (one prompt with its K responses) because some judges compare responses of the same
prompt (pairwise preference models, per-prompt normalisation); pointwise scorers simply flatten the groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlhf_loop.common.records import Episode, Messages


@dataclass(frozen=True)
class RewardQuery:
    messages: Messages  # the prompt conversation (system/user turns)
    responses: list[str]  # the candidate responses to it
    meta: dict[str, Any] = field(default_factory=dict)  # the prompt's dataset columns, for rule-based rewards
    # with an environment, one per response: its turns (a pointwise scorer sees the whole conversation, its last
    # assistant turn as the response) and its outcome (kind outcome); empty for single-turn responses
    episodes: list[Episode] = field(default_factory=list)


@dataclass(frozen=True)
class RewardResult:
    scores: list[float]  # one per response; higher is better
    objectives: dict[str, list[float]] = field(default_factory=dict)  # optional per-objective scores, one per response


class RewardModel(Protocol):
    def score(self, queries: Sequence[RewardQuery]) -> list[RewardResult]:
        """One result per query, its scores in the order of the query's responses."""
        ...


class NamedRewardModel(RewardModel, Protocol):
    objectives: list[str]  # the names its results carry in RewardResult.objectives (logged as per-objective means)
