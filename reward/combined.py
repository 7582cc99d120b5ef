"""kind combined: a weighted sum of rewards of any kind, e.g. a preference model plus a format check.

    reward:
      kind: combined
      normalize: zscore          # put the terms on one scale before weighting
      components:
        - {name: preference, weight: 1.0, reward: {kind: bradley_terry, model_path: ...}}
        - {name: format, weight: 0.5, reward: {kind: function, function: my_rewards.py:has_answer}}

Each term's raw scores are logged as objective `<name>` (and its own objectives as `<name>/<objective>`).
With normalize=zscore each term is standardised across the K responses of a prompt first, so a term with a large
spread cannot drown the others; a term that gives all K responses the same score contributes zero.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from reward.base import NamedRewardModel, RewardQuery, RewardResult
from reward.config import RewardConfig


class CombinedReward:
    """`terms` are (name, weight, scorer) with the scorers already built (by the registry, from cfg.components)."""

    def __init__(self, cfg: RewardConfig, terms: Sequence[tuple[str, float, NamedRewardModel]]) -> None:
        self.normalize = cfg.normalize
        self.terms = list(terms)
        self.objectives = [
            objective for name, _, model in self.terms
            for objective in [name, *(f"{name}/{o}" for o in model.objectives)]
        ]

    def score(self, queries: Sequence[RewardQuery]) -> list[RewardResult]:
        per_term = [(name, weight, model.score(queries)) for name, weight, model in self.terms]
        combined = []
        for q, query in enumerate(queries):
            totals = [0.0] * len(query.responses)
            objectives: dict[str, list[float]] = {}
            for name, weight, results in per_term:
                scores = results[q].scores
                for r, value in enumerate(self._normalized(scores)):
                    totals[r] += weight * value
                objectives[name] = list(scores)
                objectives.update({f"{name}/{o}": list(v) for o, v in results[q].objectives.items()})
            combined.append(RewardResult(scores=totals, objectives=objectives))
        return combined

    def _normalized(self, scores: list[float]) -> list[float]:
        if self.normalize == "none":
            return scores
        mean, spread = statistics.fmean(scores), statistics.pstdev(scores)
        return [(s - mean) / spread if spread > 1e-8 else 0.0 for s in scores]
