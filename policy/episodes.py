"""Multi-turn episodes inside a rollout actor: K episodes per prompt, run turn by turn with an environment
(`rlhf_loop.common.environments`), every live episode of the call sampled in one engine call per turn.

    runner = EpisodeRunner(cfg.environment, tokenizer)
    rollouts = runner.run(engine, prompts, sampling)     # one Rollout per prompt, K episodes as its responses

An episode's tokens are the prompt's, then each turn's sampled tokens followed by what the chat template and the
environment add before the next turn (`rlhf_loop.common.chat.tokens_after_turn`): exactly the context each turn was
sampled from, so the learner trains on what the policy saw, with its loss mask on the sampled tokens only. With the
environment's tools, every rendering passes them; where the tokenizer has a response_template, the environment steps
on the turn as the template parses it (content, tool_calls), while the tokens stay the sampled ones.

Reproducibility, as for single turns: turn t of episode k of prompt p samples with its own seed (the engine's
per-prompt seed for index p x K + k, from a call seed derived from the iteration's and t), so an episode does not
depend on which other episodes share a call, on how prompts are split across engines, or on a restarted shard;
the environment must be deterministic given its row and the assistant's messages.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from policy.config import EnvironmentConfig
from policy.rollout_protocol import RolloutEngine, Sampling
from rlhf_loop.common.chat import check_response_template, sampled_message, tokens_after_turn
from rlhf_loop.common.environments import (Environment, checked_step, environment_tools, first_messages,
                                           load_environment)
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.faults import maybe_kill_actor
from rlhf_loop.common.records import Episode, Messages, Prompt, Response, Rollout
from rlhf_loop.common.seeds import derived_seed


@dataclass
class _Live:
    """An episode while it runs."""

    prompt: Prompt
    environment: Environment
    tools: list[dict[str, Any]] | None  # the environment's, as the prompt was rendered with them
    messages: Messages = field(default_factory=list)  # after the prompt
    token_ids: list[int] = field(default_factory=list)  # after the prompt
    loss_mask: list[int] = field(default_factory=list)
    turns: int = 0
    text: str = ""  # the last assistant turn
    outcome: float | None = None
    end: str | None = None  # set when it ended (records.EPISODE_ENDS)

    def response(self) -> Response:
        episode = Episode(self.messages, self.loss_mask, self.turns, self.end, self.outcome)
        return Response(self.text, self.token_ids, "stop" if self.end == "done" else "length", episode)


class EpisodeRunner:
    def __init__(self, cfg: EnvironmentConfig, tokenizer: Any):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.factory = load_environment(cfg.factory)
        check_response_template(tokenizer)

    def run(self, engine: RolloutEngine, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        """K = sampling.n episodes for every prompt, in prompt order; each turn of all live episodes in one call."""
        episodes = [self._start(prompt) for prompt in prompts for _ in range(sampling.n)]
        turn = 0
        while live := [(number, episode) for number, episode in enumerate(episodes) if episode.end is None]:
            turn += 1
            if turn == 2:
                maybe_kill_actor("episodes")  # the kill tests' RLHF_LOOP_KILL_ACTOR: die in the middle of a shard
            turn_sampling = replace(sampling, n=1, seed=derived_seed(sampling.seed, "turn", turn))
            contexts = [Prompt(index=episode.prompt.index * sampling.n + number % sampling.n, messages=[],
                               token_ids=[*episode.prompt.token_ids, *episode.token_ids])
                        for number, episode in live]
            for (_, episode), rollout in zip(live, engine.generate(contexts, turn_sampling), strict=True):
                self._take_turn(episode, rollout.responses[0], sampling.max_tokens)
        return [Rollout(prompt, [episode.response() for episode in episodes[i * sampling.n:(i + 1) * sampling.n]])
                for i, prompt in enumerate(prompts)]

    def _start(self, prompt: Prompt) -> _Live:
        environment = self.factory()
        messages = first_messages(environment, prompt.meta, self.cfg.factory)
        tools = environment_tools(environment, self.cfg.factory)
        if messages != prompt.messages or tools != prompt.tools:
            raise UserError(f"environment {self.cfg.factory}: reset gave other first messages or tools for prompt "
                            f"{prompt.index} than when the prompts were made; reset must depend on the row alone")
        return _Live(prompt, environment, tools)

    def _take_turn(self, episode: _Live, response: Response, max_tokens: int) -> None:
        """The sampled turn joins the episode; the environment replies, and the episode ends or its next turn's
        context grows by the template's closing of this turn, the reply and the generation prompt."""
        message = sampled_message(self.tokenizer, response.token_ids, [*episode.prompt.token_ids, *episode.token_ids],
                                  response.text, episode.tools)
        episode.messages.append(message)
        episode.token_ids += response.token_ids
        episode.loss_mask += [1] * len(response.token_ids)
        episode.turns += 1
        episode.text = response.text
        step = checked_step(episode.environment.step(copy.deepcopy(message)), self.cfg.factory)
        if step.outcome is not None:
            episode.outcome = step.outcome
        if step.done:
            episode.messages += step.messages  # kept for the record; no token follows them
            episode.end = "done"
            return
        if response.finish_reason == "length":
            episode.end = "turn_cut"  # no closing token to append after: the turn never ended
            return
        if episode.turns >= self.cfg.max_turns:
            episode.end = "max_turns"
            return
        try:
            following = tokens_after_turn(self.tokenizer, [*episode.prompt.messages, *episode.messages],
                                          step.messages, response.token_ids, episode.tools)
        except ValueError as e:
            raise UserError(f"environment {self.cfg.factory}: {e}") from None
        if len(episode.token_ids) + len(following) + max_tokens > self.cfg.max_episode_tokens:
            episode.end = "max_tokens"
            return
        episode.messages += step.messages
        episode.token_ids += following
        episode.loss_mask += [0] * len(following)
