"""Pair selection: from the K scored responses of a prompt, pick (chosen, rejected) pairs, or none.

A strategy returns the indices (chosen, rejected) of one prompt's responses. With `pairs.per_prompt` N > 1, a prompt
gives N pairs, picked by `pairs.multi`: the best response against each of the N worst (best_vs_worst), or the i-th
best against the i-th worst for i = 1..N (top_vs_bottom). Pairs that would teach nothing are dropped and counted:
identical texts (of episodes: identical turns), and score gaps not above `pairs.min_margin` (ties). Prompts whose
K scores all lie within `pairs.min_margin` of each other can give no pair at all; they are counted too
(`flat_prompts`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rlhf_loop.common.records import Pair, Response, Scored
from rlhf_loop.common.seeds import derived_seed
from rlhf_loop.config import PAIR_MULTI

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


def several_pairs(scores: Sequence[float], count: int, multi: str) -> list[tuple[int, int]]:
    """`count` pairs of one prompt, by rank (ties broken by position, so the choice is deterministic): the best
    against each of the `count` worst, worst first; or the i-th best against the i-th worst."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # best first
    if multi == "best_vs_worst":
        return [(order[0], rejected) for rejected in reversed(order[-count:])]
    if multi == "top_vs_bottom":
        return [(order[i], order[-1 - i]) for i in range(count)]
    raise ValueError(f"pairs.multi {multi!r} is unknown; use one of {list(PAIR_MULTI)}")


def _same(a: Response, b: Response) -> bool:
    """Identical responses teach nothing: the same text, or for episodes the same turns (same tokens)."""
    return a.token_ids == b.token_ids if a.episode is not None else a.text == b.text


@dataclass(frozen=True)
class PairSelection:
    pairs: list[Pair]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count of pairs: "tie", "identical"
    flat_prompts: int = 0  # prompts whose K scores all lie within min_margin: no pair of theirs can be kept


def select_pairs(scored: Sequence[Scored], strategy: str, min_margin: float, seed: int, per_prompt: int = 1,
                 multi: str = "best_vs_worst") -> PairSelection:
    """`per_prompt` pairs per prompt at most (one by `strategy`, several by `multi`); `seed` (run seed and
    iteration) makes random strategies reproducible."""
    choose = STRATEGIES[strategy]
    pairs, dropped, flat_prompts = [], Counter(), 0
    for item in scored:
        prompt = item.rollout.prompt
        flat_prompts += max(item.scores) - min(item.scores) <= min_margin
        if per_prompt == 1:
            candidates = [choose(item.scores, random.Random(derived_seed("pairs", seed, prompt.index, bits=64)))]
        else:
            candidates = several_pairs(item.scores, per_prompt, multi)
        for chosen, rejected in candidates:
            chosen_response, rejected_response = item.rollout.responses[chosen], item.rollout.responses[rejected]
            if _same(chosen_response, rejected_response):
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
                    policy_version=item.rollout.policy_version,
                    policy_step=item.rollout.policy_step,
                ))
    return PairSelection(pairs, dict(dropped), flat_prompts)
