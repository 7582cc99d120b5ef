"""Numbers about a scoring stage that reach the metrics."""

from __future__ import annotations

from collections.abc import Sequence

from reward.base import RewardResult


def objective_means(results: Sequence[RewardResult]) -> dict[str, float]:
    """Mean of each per-objective score over every scored response (e.g. ArmoRM's 19 objectives)."""
    totals: dict[str, list[float]] = {}
    for result in results:
        for name, values in result.objectives.items():
            totals.setdefault(name, []).extend(values)
    return {name: sum(values) / len(values) for name, values in totals.items() if values}
