"""kind outcome: an episode's score is the outcome its environment gave (docs/environments.md).

    environment: {factory: my_env.py:GuessTheNumber}
    reward: {kind: outcome}

Mixed with a reward model on the whole conversation through kind combined, e.g. the outcome plus a small
preference-model term. An episode the environment gave no outcome (cut by a budget before it ended) scores
`reward.missing_outcome`.
"""

from __future__ import annotations

from collections.abc import Sequence

from reward.base import RewardQuery, RewardResult
from reward.config import RewardConfig
from reward.groups import check_finite, describe, regroup, ungroup
from rlhf_loop.common.errors import UserError


class OutcomeReward:
    objectives: list[str] = []

    def __init__(self, cfg: RewardConfig) -> None:
        self.missing = cfg.missing_outcome

    def score(self, queries: Sequence[RewardQuery]) -> list[RewardResult]:
        if any(not query.episodes for query in queries):
            raise UserError("reward kind outcome scores episodes, and these responses are single turns: set "
                            "environment.factory, or use another reward kind")
        outcomes = [episode.outcome for query in queries for episode in query.episodes]
        scores = [self.missing if outcome is None else outcome for outcome in outcomes]
        samples = ungroup(queries)
        check_finite(scores, lambda i: describe(samples[i]), "the environment's outcome")
        return regroup(queries, scores)
