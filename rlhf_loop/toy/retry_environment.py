"""The bundled environment: the toy task (`rlhf_loop.toy.task`) as a multi-turn episode that runs on a CPU.

The user asks for N words of a category; a perfect answer (gold 1) ends the episode; any other answer gets the
question asked again, up to environment.max_turns answers. The outcome is the gold score of the last answer less
`TURN_COST` for every retry, so an episode that answers right at once beats one that gets there on its third try,
which beats one that never does. The eval's gold rule (`rlhf_loop.toy.task:gold_reward`) scores an episode's last
answer.

    environment: {factory: rlhf_loop.toy.retry_environment:WordListRetry, max_turns: 3}
    reward: {kind: outcome}
"""

from __future__ import annotations

from typing import Any

from rlhf_loop.common.environments import Step
from rlhf_loop.common.records import Messages
from rlhf_loop.toy.task import gold_reward

TURN_COST = 0.1  # outcome lost per retry


class WordListRetry:
    def reset(self, row: dict[str, Any]) -> Messages:
        """The row's question (the toy prompts' `prompt` column); `category` and `count` make the gold rule."""
        self.row, self.retries = row, 0
        self.question = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
        return self.question

    def step(self, message: dict[str, str]) -> Step:
        gold = gold_reward([], message["content"], self.row)
        outcome = gold - TURN_COST * self.retries
        if gold == 1.0:
            return Step(done=True, outcome=outcome)
        self.retries += 1
        return Step(messages=[self.question[-1]], outcome=outcome)  # asked again; the outcome so far, if cut here
