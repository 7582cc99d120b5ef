"""Waiting on a group's ranks: the first rank that fails stops the wait at once and is named, while the other ranks
still wait (as they would in a collective the failed rank never joins)."""

from __future__ import annotations

import time

import pytest

from rlhf_loop.common.actor_calls import ActorTimeout, RankFailed, wait_ranks
from rlhf_loop.common.errors import UserError


@pytest.mark.integration
def test_a_failing_rank_is_named_at_once_while_the_others_still_wait(ray_local):
    ray = ray_local

    class Rank:  # defined here, so that Ray sends the class itself to the workers (they cannot import tests/)
        def run(self, rank: int, fails: str | None) -> int:
            if fails == "user":
                raise UserError("the pairs do not fit max_length")
            if fails == "bug":
                raise KeyError("chosen_ids")
            time.sleep(60 if fails == "hangs" else 0)
            return rank

    actors = [ray.remote(Rank).options(num_cpus=0).remote() for _ in range(2)]
    try:
        assert wait_ranks([a.run.remote(rank, None) for rank, a in enumerate(actors)], 60, "learner", "train",
                          "train.call_timeout_s") == [0, 1]
        for fails, error, message in (("bug", RankFailed, "learner rank 1 failed during prepare_pairs: 'chosen_ids'"),
                                      ("user", UserError, "learner rank 1: the pairs do not fit max_length")):
            began = time.monotonic()
            with pytest.raises(error) as raised:
                wait_ranks([actors[0].run.remote(0, "hangs"), actors[1].run.remote(1, fails)], 600, "learner",
                           "prepare_pairs", "train.call_timeout_s")
            assert str(raised.value) == message and time.monotonic() - began < 30  # not the 600 s timeout
            ray.kill(actors[0])  # still in its 60 s sleep
            actors[0] = ray.remote(Rank).options(num_cpus=0).remote()
        with pytest.raises(ActorTimeout, match="learner rank 0 did not answer within 1 s"):
            wait_ranks([actors[0].run.remote(0, "hangs"), actors[1].run.remote(1, None)], 1, "learner", "train",
                       "train.call_timeout_s")
    finally:
        for actor in actors:
            ray.kill(actor)
