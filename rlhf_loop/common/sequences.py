"""Token sequences cut to a length and padded into batches: the one place the learners (policy/) and the reward models
(reward/) do it, so that what the reward model scores and what DPO trains on are cut by the same rules.

    head = PromptHead.of(tokenizer)                                            # once per tokenizer
    prompt, response = cut_pair(prompt_ids, response_ids, max_prompt_length, max_length, head.length(prompt_ids))
    batch = pad_pairs([(prompt, response), ...], pad_token_id, device)         # learners: response_mask
    batch = pad_pairs(sequences, pad_token_id, device, loss_masks)            # episodes: the policy's tokens only
    for batch in padded_batches(sequences, batch_size, pad_id, device): ...     # reward models: last_positions

Ours rather than the tokenizer's `truncation_side` and `tokenizer.pad`: those cut one sequence from one side, and
pad what they are given in the order given. A prompt cut here keeps its head (BOS and the system turn: what the
model was told to be) and loses the oldest turns after it; a response keeps its start; and the reward models'
batches are sorted by length, with each row's last real token recorded for pooling. A leaf module (torch only).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

_PROBE = "\x00system\x00"  # a system message's content no real prompt holds: where the template puts it


@dataclass(frozen=True)
class PromptHead:
    """What a cut prompt keeps at its start, from the tokenizer: BOS, and a system turn (its opening tokens and
    the tokens that close it, as the tokenizer's own chat template renders a system message)."""

    bos_token_id: int | None
    system_opening: tuple[int, ...] = ()
    system_closing: tuple[int, ...] = ()

    @classmethod
    def of(cls, tokenizer: Any) -> PromptHead:
        try:
            text = tokenizer.apply_chat_template([{"role": "system", "content": _PROBE}], tokenize=False)
        except Exception:  # a template without a system role: BOS is all there is to keep
            text = ""
        if _PROBE not in text:
            return cls(tokenizer.bos_token_id)
        before, after = text.split(_PROBE, 1)
        return cls(tokenizer.bos_token_id, tuple(tokenizer(before, add_special_tokens=False)["input_ids"]),
                   tuple(tokenizer(after, add_special_tokens=False)["input_ids"]))

    def length(self, prompt_ids: Sequence[int]) -> int:
        """How many leading tokens of `prompt_ids` a cut keeps: BOS, and the whole system turn when it opens so."""
        bos = int(bool(prompt_ids) and self.bos_token_id is not None and prompt_ids[0] == self.bos_token_id)
        opening, closing = list(self.system_opening), list(self.system_closing)
        if not opening or not closing or list(prompt_ids[:len(opening)]) != opening:
            return bos
        end = _find(prompt_ids, closing, len(opening))
        return bos if end is None else max(bos, end + len(closing))


def _find(haystack: Sequence[int], needle: list[int], start: int) -> int | None:
    for position in range(start, len(haystack) - len(needle) + 1):
        if list(haystack[position:position + len(needle)]) == needle:
            return position
    return None


def cut_prompt(prompt_ids: Sequence[int], max_length: int, head: int = 0) -> list[int]:
    """At most `max_length` tokens: the first `head` (BOS, the system turn) and the last ones (the turn being
    answered); the oldest turns in between go first. A head longer than half the room keeps only BOS (head 1)."""
    if len(prompt_ids) <= max_length:
        return list(prompt_ids)
    if head > max_length // 2:
        head = min(head, 1)
    return [*prompt_ids[:head], *prompt_ids[len(prompt_ids) - (max_length - head):]]


def cut_pair(prompt_ids: Sequence[int], response_ids: Sequence[int], max_prompt_length: int, max_length: int,
             head: int = 0) -> tuple[list[int], list[int]]:
    """The prompt cut to `max_prompt_length` (`cut_prompt`), then the response's start, to `max_length` in all."""
    prompt = cut_prompt(prompt_ids, max_prompt_length, head)
    return prompt, list(response_ids[: max_length - len(prompt)])


@dataclass(frozen=True)
class CutCounts:
    """How many pairs a cut shortens: their prompt, or a response (chosen or rejected)."""

    prompts: int
    responses: int


def count_cuts(pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]], max_prompt_length: int,
               max_length: int) -> CutCounts:
    """Of (prompt, chosen, rejected) token lists, how many `cut_pair` shortens (the head kept changes no count)."""
    prompts = responses = 0
    for prompt, chosen, rejected in pairs:
        kept = min(len(prompt), max_prompt_length)
        prompts += len(prompt) > max_prompt_length
        responses += kept + max(len(chosen), len(rejected)) > max_length
    return CutCounts(prompts, responses)


@dataclass(frozen=True)
class PairBatch:
    """(prompt, response) rows, right-padded, with the response tokens marked: what a learner scores."""

    input_ids: torch.Tensor  # [batch, length]
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # 1 on response tokens: the ones whose log-probability counts


def pad_pairs(sequences: Sequence[tuple[list[int], list[int]]], pad_token_id: int, device: torch.device | str,
              loss_masks: Sequence[Sequence[int] | None] | None = None) -> PairBatch:
    """(prompt, response) token lists as one right-padded batch, in the order given. `loss_masks`, per row: 1 per
    response token that counts (an episode's sampled tokens; `records.Episode.loss_mask`, its start when the
    response was cut), or None where every response token does."""
    input_ids, attention_mask = _right_padded([prompt + response for prompt, response in sequences], pad_token_id)
    response_mask = torch.zeros_like(attention_mask)
    for row, (prompt, response) in enumerate(sequences):
        mask = loss_masks[row] if loss_masks is not None else None
        response_mask[row, len(prompt):len(prompt) + len(response)] = (
            1 if mask is None else torch.tensor(list(mask[:len(response)]), dtype=response_mask.dtype))
    return PairBatch(input_ids.to(device), attention_mask.to(device), response_mask.to(device))


@dataclass(frozen=True)
class PaddedBatch:
    """Rows of one length class, right-padded: what a reward model scores."""

    indices: list[int]  # positions of these rows in the caller's list of sequences
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_positions: torch.Tensor  # index of each row's last real token


def padded_batches(sequences: Sequence[list[int]], batch_size: int, pad_id: int, device: torch.device | str
                   ) -> Iterator[PaddedBatch]:
    """Right-padded batches of similar length (longest first), so padding is small and the order deterministic.

    Right padding keeps every real token at the position it has when scored alone: with causal attention the
    pads after it cannot change it, so a score does not depend on what else is in the batch.
    """
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        input_ids, attention_mask = _right_padded([sequences[index] for index in indices], pad_id)
        yield PaddedBatch(indices=indices, input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                          last_positions=(attention_mask.sum(dim=1) - 1).to(device))


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, :len(row)] = torch.tensor(list(row), dtype=torch.long)
        attention_mask[index, :len(row)] = 1
    return input_ids, attention_mask
