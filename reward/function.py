"""kind function: a user's Python function is the reward (rule-based checks, verifiable answers).

    # my_rewards.py, anywhere on disk             reward: {kind: function, function: my_rewards.py:exact_match}
    def exact_match(messages, response, meta):
        return float(response.strip() == meta["answer"])

With `function_batched: true` the function takes lists (messages, responses, metas) of up to batch_size samples
and returns a list of floats.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import numbers
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reward.base import RewardQuery, RewardResult
from reward.config import RewardConfig
from reward.groups import ResponseToScore, check_finite, describe, regroup, ungroup
from rlhf_loop.common.errors import UserError


def load_code_reference(reference: str, key: str) -> Any:
    """The object named by "path/to/file.py:name" or "package.module:name"; `key` is the config key, for errors.

    The last ":" splits off the attribute; a location ending in .py is a file, anything else a module on sys.path.
    """
    location, _, attribute = reference.rpartition(":")
    try:
        module = _import_file(Path(location)) if location.endswith(".py") else importlib.import_module(location)
    except UserError:
        raise
    except Exception as e:  # whatever the user's module raises while importing
        raise UserError(f"{key} {reference!r}: importing {location} failed: {type(e).__name__}: {e}") from None
    if not hasattr(module, attribute):
        raise UserError(f"{key} {reference!r}: {location} defines no {attribute!r}")
    return getattr(module, attribute)


def _import_file(path: Path):
    path = path.expanduser().resolve()
    if not path.is_file():
        raise UserError(f"reward function file {path} does not exist")
    # A name unique to the file, so two users' reward.py files never shadow each other in sys.modules.
    name = f"rlhf_loop_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


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
