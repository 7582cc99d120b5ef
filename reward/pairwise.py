"""kind pairwise: a causal-LM judge reads the conversation and two responses and answers "A" or "B".

As in RLHFlow's pair-preference model, the judge's user turn is
"[CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b}", and P(A better than B) is the softmax of
the logits of the "A" and "B" tokens at the answer position. Every comparison runs in both orders and averages them
(P(i > j) = (P_A(i, j) + 1 - P_A(j, i)) / 2), which cancels the judge's position bias: P(i > j) + P(j > i) = 1.

The K responses of a prompt are then ranked (pair selection uses the ranking through the scores):
- all_pairs: score_i = mean over j != i of P(i > j), the expected win rate; K(K-1)/2 comparisons.
- tournament: a knockout bracket in response order (an odd one out gets a bye); K-1 comparisons. score = the round
  of a response's last match + its win probability there, so going further always scores higher, the champion
  scores highest, and responses knocked out in the same round are ordered by how close they came.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reward import hf
from reward.base import RewardQuery, RewardResult
from reward.config import RewardConfig
from reward.groups import check_finite, refuse_episodes
from rlhf_loop.common.chat import chat_token_ids
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.hf_models import load_tokenizer
from rlhf_loop.common.records import Messages

NEUTRAL = 0.5  # the score of a lone response: nothing to compare it with


@dataclass(frozen=True)
class Match:
    query_index: int
    first: int  # response indices; P(first beats second) is what a comparison returns
    second: int


class PairwiseJudge:
    objectives: list[str] = []

    def __init__(self, cfg: RewardConfig, device: str, key: str = "reward") -> None:
        from transformers import AutoModelForCausalLM

        self.path, self.batch_size, self.max_length = cfg.model_path, cfg.batch_size, cfg.max_length
        self.settings, self.device = cfg.pairwise, torch.device(device)
        hf.read_model_config(cfg.model_path, cfg.trust_remote_code, key)
        self.tokenizer = load_tokenizer(cfg.model_path, cfg.trust_remote_code, f"{key}.model_path")
        try:
            cfg.pairwise.template.format(context="", response_a="", response_b="")
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"{key}.pairwise.template has a placeholder other than {{context}}, {{response_a}}, "
                            f"{{response_b}} ({e!r}); write literal braces as {{{{ and }}}}") from None
        self.answer_ids = [self._single_token(t, key) for t in (cfg.pairwise.token_a, cfg.pairwise.token_b)]
        self.template_tokens = len(self._render("", "", ""))
        self.model = hf.load_model(AutoModelForCausalLM, cfg, device, key, "a causal LM judge",
                                   "is not a trained judge", "judge")
        self.pad_id = hf.pad_token_id(self.model.config, self.tokenizer, cfg.model_path)

    def _single_token(self, text: str, key: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise UserError(f"{key}.pairwise answer token {text!r} is {len(ids)} tokens for {self.path!r}; "
                            "token_a and token_b must each be a single token of the judge")
        return ids[0]

    def score(self, queries: Sequence[RewardQuery]) -> list[RewardResult]:
        refuse_episodes(queries, "pairwise")
        if self.settings.ranking == "all_pairs":
            scores = self._all_pairs(queries)
        else:
            scores = self._tournament(queries)
        return [RewardResult(scores=s) for s in scores]

    # -- ranking ------------------------------------------------------------------------------------------------

    def _all_pairs(self, queries: Sequence[RewardQuery]) -> list[list[float]]:
        matches = [Match(q, i, j) for q, query in enumerate(queries)
                   for i in range(len(query.responses)) for j in range(i + 1, len(query.responses))]
        wins = [[0.0] * len(query.responses) for query in queries]
        for match, p_first in zip(matches, self.compare(queries, matches)):
            wins[match.query_index][match.first] += p_first
            wins[match.query_index][match.second] += 1.0 - p_first
        return [[w / (len(row) - 1) if len(row) > 1 else NEUTRAL for w in row] for row in wins]

    def _tournament(self, queries: Sequence[RewardQuery]) -> list[list[float]]:
        scores = [[NEUTRAL] * len(query.responses) for query in queries]
        alive = [list(range(len(query.responses))) for query in queries]
        round_number = 0
        while any(len(entrants) > 1 for entrants in alive):
            matches = [Match(q, entrants[k], entrants[k + 1])
                       for q, entrants in enumerate(alive) for k in range(0, len(entrants) - 1, 2)]
            losers: set[tuple[int, int]] = set()
            for match, p_first in zip(matches, self.compare(queries, matches)):
                first_wins = p_first >= 0.5
                scores[match.query_index][match.first] = round_number + p_first
                scores[match.query_index][match.second] = round_number + 1.0 - p_first
                losers.add((match.query_index, match.second if first_wins else match.first))
            alive = [[i for i in entrants if (q, i) not in losers] for q, entrants in enumerate(alive)]
            round_number += 1
        return scores

    # -- comparisons --------------------------------------------------------------------------------------------

    def compare(self, queries: Sequence[RewardQuery], matches: Sequence[Match]) -> list[float]:
        """P(first beats second) for each match, averaged over both presentation orders."""
        prompts = []
        for m in matches:
            query = queries[m.query_index]
            a, b = query.responses[m.first], query.responses[m.second]
            prompts += [self.judge_prompt(query.messages, a, b), self.judge_prompt(query.messages, b, a)]
        p_a = self._prob_a(prompts)
        probabilities = [(p_a[2 * k] + 1.0 - p_a[2 * k + 1]) / 2 for k in range(len(matches))]
        check_finite(probabilities, lambda k: self._describe(queries, matches[k]), f"pairwise judge {self.path}")
        return probabilities

    def judge_prompt(self, messages: Messages, response_a: str, response_b: str) -> list[int]:
        """Token ids of the judge's input; over-long inputs lose the oldest context first, then response ends."""
        budget = self.max_length - self.template_tokens
        context, a, b = (self.tokenizer.encode(text, add_special_tokens=False)
                         for text in (render_context(messages), response_a, response_b))
        if len(context) + len(a) + len(b) > budget:
            keep = max(budget // 3, budget - len(a) - len(b))
            context = context[len(context) - keep:] if len(context) > keep else context
            each = max(budget - len(context), 0) // 2
            a, b = a[:each], b[:each]
        pieces = (self.tokenizer.decode(ids) for ids in (context, a, b))
        return hf.truncate_left(self._render(*pieces), self.max_length, self.tokenizer.bos_token_id)

    def _render(self, context: str, response_a: str, response_b: str) -> list[int]:
        text = self.settings.template.format(context=context, response_a=response_a, response_b=response_b)
        return chat_token_ids(self.tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)

    def _prob_a(self, prompts: Sequence[list[int]]) -> list[float]:
        """Softmax over the answer tokens' logits at each prompt's last position: the probability of "A"."""
        probabilities = [0.0] * len(prompts)
        with torch.inference_mode():
            for batch in hf.padded_batches(prompts, self.batch_size, self.pad_id, self.device):
                # Only the positions from the shortest row's end onwards are needed; rows have similar lengths.
                keep = batch.input_ids.shape[1] - int(batch.last_positions.min())
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    logits_to_keep=keep).logits
                rows = torch.arange(len(batch.indices), device=logits.device)
                answer = logits[rows, batch.last_positions - (batch.input_ids.shape[1] - keep)][:, self.answer_ids]
                p_a = torch.softmax(answer.float() / self.settings.temperature, dim=-1)[:, 0].cpu()
                for row, index in enumerate(batch.indices):
                    probabilities[index] = float(p_a[row])
        return probabilities

    @staticmethod
    def _describe(queries: Sequence[RewardQuery], match: Match) -> str:
        return f"query {match.query_index} responses {match.first} vs {match.second}"


def render_context(messages: Messages) -> str:
    """The conversation as plain turns, the shape RLHFlow's pair-preference model was trained on."""
    turns = "".join(f"\n\n<turn> {m['role']}\n {m['content']}" for m in messages)
    return f"\n{turns}\n\n\n"
