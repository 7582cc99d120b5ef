"""Pair selection: from the K scored responses of a prompt, pick a (chosen, rejected) pair, or none.

A strategy returns the indices (chosen, rejected) of one prompt's responses. Pairs that would teach nothing are
dropped and counted: identical texts, and score gaps not above `pairs.min_margin` (ties).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rlhf_loop.records import Pair, Scored
from rlhf_loop.seeds import derived_seed

Strategy = Callable[[Sequence[float], random.Random], tuple[int, int]]


def max_min(scores: Sequence[float], rng: random.Random) -> tuple[int, int]:
    """Best vs worst (RLHFlow, Magpie). Ties go to the earliest response, so the choice is deterministic."""
    best = max(range(len(scores)), key=scores.__getitem__)
    return best, min((i for i in range(len(scores)) if i != best), key=scores.__getitem__)


def max_random(scores: Sequence[float], rng: random.Random) -> tuple[int, int]:
    """Best vs a random other response: softer negatives than the worst one."""
    best = max(range(len(scores)), key=scores.__getitem__)
    return best, rng.choice([i for i in range(len(scores)) if i != best])


def random_pair(scores: Sequence[float], rng: random.Random) -> tuple[int, int]:
    """Two random responses, the higher-scored one chosen."""
    a, b = rng.sample(range(len(scores)), 2)
    return (a, b) if scores[a] >= scores[b] else (b, a)


STRATEGIES: dict[str, Strategy] = {"max_min": max_min, "max_random": max_random, "random": random_pair}


@dataclass(frozen=True)
class PairSelection:
    pairs: list[Pair]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count: "tie", "identical"


def select_pairs(scored: Sequence[Scored], strategy: str, min_margin: float, seed: int) -> PairSelection:
    """One pair per prompt at most; `seed` (run seed and iteration) makes random strategies reproducible."""
    choose = STRATEGIES[strategy]
    pairs, dropped = [], Counter()
    for item in scored:
        prompt = item.rollout.prompt
        chosen, rejected = choose(item.scores, random.Random(derived_seed("pairs", seed, prompt.index, bits=64)))
        chosen_response, rejected_response = item.rollout.responses[chosen], item.rollout.responses[rejected]
        if chosen_response.text == rejected_response.text:
            dropped["identical"] += 1
        elif item.scores[chosen] - item.scores[rejected] <= min_margin:
            dropped["tie"] += 1
        else:
            pairs.append(Pair(
                prompt_index=prompt.index,
                prompt_messages=prompt.messages,
                prompt_token_ids=prompt.token_ids,
                chosen=chosen_response,
                rejected=rejected_response,
                chosen_score=item.scores[chosen],
                rejected_score=item.scores[rejected],
            ))
    return PairSelection(pairs, dict(dropped))
