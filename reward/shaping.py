"""What the loop does to a reward model's scores before pairing them: user weights over a multi-objective model's
objectives (`reward.objective_weights`, in the reward actor) and a per-token length penalty (`reward.length_penalty`,
where the loop scores its rollouts, since only it knows the token counts). Neither touches the kinds themselves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from reward.base import RewardResult


def objective_weights_problem(weights: Mapping[str, float], objectives: Sequence[str]) -> str | None:
    """A one-line error when the weights name objectives the reward model does not report."""
    unknown = sorted(set(weights) - set(objectives))
    if not unknown:
        return None
    reported = f"it reports {list(objectives)}" if objectives else "it reports none (it is not multi-objective)"
    return f"reward.objective_weights names {unknown}, which the reward model does not report; {reported}"


def weigh_objectives(results: Sequence[RewardResult], weights: Mapping[str, float]) -> list[RewardResult]:
    """Each response's score becomes sum over objectives of weight x objective score (the objectives stay as they
    were, for the logs); with no weights the results are returned as they are."""
    if not weights:
        return list(results)
    return [
        RewardResult(
            scores=[sum(weight * result.objectives[name][r] for name, weight in weights.items())
                    for r in range(len(result.scores))],
            objectives=result.objectives,
        )
        for result in results
    ]


def length_penalized(scores: Sequence[float], token_counts: Sequence[int], penalty: float) -> list[float]:
    """score - penalty x response tokens: a reward that cannot be raised by answering longer alone."""
    return [score - penalty * tokens for score, tokens in zip(scores, token_counts, strict=True)]
