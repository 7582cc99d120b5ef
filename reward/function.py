"""kind function: a user's Python function is the reward (rule-based checks, verifiable answers).

    # my_rewards.py, anywhere on disk             reward: {kind: function, function: my_rewards.py:exact_match}
    def exact_match(messages, response, meta):
        return float(response.strip() == meta["answer"])

With `function_batched: true` the function takes lists (messages, responses, metas) of up to batch_size samples
and returns a list of floats.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

from reward.base import RewardQuery, RewardResult
from reward.config import RewardConfig
from reward.groups import ResponseToScore, check_finite, describe, regroup, ungroup
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.user_code import load_code_reference


class FunctionReward:
    objectives: list[str] = []

    def __init__(self, cfg: RewardConfig, key: str = "reward") -> None:
        self.reference, self.batched, self.batch_size = cfg.function, cfg.function_batched, cfg.batch_size
        self.function: Callable = load_code_reference(cfg.function, f"{key}.function")
        if not callable(self.function):
            raise UserError(f"{key}.function {cfg.function!r} is not callable")

    def score(self, queries: Sequence[RewardQuery]) -> list[RewardResult]:
        samples = ungroup(queries)
        scores = self._score_batched(samples) if self.batched else [self._score_one(s) for s in samples]
        check_finite(scores, lambda i: describe(samples[i]), f"reward function {self.reference}")
        return regroup(queries, scores)

    def _score_one(self, sample: ResponseToScore) -> float:
        return self._as_float(self.function(sample.messages, sample.response, sample.meta), sample)

    def _score_batched(self, samples: list[ResponseToScore]) -> list[float]:
        scores = []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start:start + self.batch_size]
            values = self.function([s.messages for s in chunk], [s.response for s in chunk], [s.meta for s in chunk])
            if not isinstance(values, Sequence) or len(values) != len(chunk):
                count = len(values) if isinstance(values, Sequence) else type(values).__name__
                raise UserError(f"reward function {self.reference} returned {count} values for a batch of "
                                f"{len(chunk)} samples; a batched function returns one float per sample")
            scores += [self._as_float(value, sample) for value, sample in zip(values, chunk)]
        return scores

    def _as_float(self, value: Any, sample: ResponseToScore) -> float:
        if isinstance(value, numbers.Real):
            return float(value)
        raise UserError(f"reward function {self.reference} returned {type(value).__name__} {value!r:.40} for "
                        f"{describe(sample)}; it must return a float")
