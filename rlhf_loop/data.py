"""Prompt sets: loaded through HF `datasets`, rendered with the policy's chat template, sliced per iteration."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_loop.errors import UserError
from rlhf_loop.records import Messages, Prompt

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class PromptSet:
    prompts: list[Prompt]
    skipped_too_long: int  # prompts over the token limit, left out and counted


def load_rows(source: str, split: str):
    """A HF dataset from a local .json/.jsonl/.parquet file or, for anything else, the hub."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise UserError(f"dataset file {source} does not exist; fix the path in the config")
        if path.stat().st_size == 0:
            raise UserError(f"dataset file {source} is empty; it needs at least one row")
        try:
            return datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as e:  # malformed JSON/parquet surfaces as many exception types
            raise UserError(f"cannot read {source} as {path.suffix[1:]}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'malformed file'}") from None
    if path.exists():
        raise UserError(f"{source} is not a .json, .jsonl or .parquet file; convert it or name a hub dataset")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # the hub raises many types; all mean the same thing to the user
        raise UserError(f"cannot load dataset {source!r} (split {split!r}): {str(e).splitlines()[0]}") from None


def as_messages(value: Any, column: str, source: str) -> Messages:
    """A prompt cell as chat messages: a list of {"role", "content"} dicts, or a plain string made a user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise UserError(f"column {column!r} of {source} holds {type(value).__name__} values; it must hold strings or "
                    f"lists of {{'role', 'content'}} messages: set data.prompt_column to such a column")


def render_prompts(rows, column: str, source: str, tokenizer, max_tokens: int, first_index: int = 0) -> PromptSet:
    """Render each row's prompt with the chat template; skip (and count) those longer than max_tokens."""
    if column not in rows.column_names:
        raise UserError(f"prompt column {column!r} is not in {source} (columns: {', '.join(rows.column_names)}); "
                        f"set data.prompt_column to one of them")
    prompts, skipped = [], 0
    for offset, row in enumerate(rows):
        messages = as_messages(row[column], column, source)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(token_ids) > max_tokens:
            skipped += 1
            continue
        meta = {key: value for key, value in row.items() if key != column and _is_json(value)}
        prompts.append(Prompt(index=first_index + offset, messages=messages, token_ids=token_ids, meta=meta))
    return PromptSet(prompts, skipped)


def iteration_prompts(data, iteration: int, tokenizer, seed: int) -> PromptSet:
    """The prompts of one iteration (1-based): its own dataset, or its slice of the shared one."""
    per_iteration = len(data.prompts) > 1
    source = data.prompts[iteration - 1] if per_iteration else data.prompts[0]
    rows = load_rows(source, data.split)
    if data.shuffle:
        rows = rows.shuffle(seed=seed)
    first = 0
    if data.prompts_per_iteration is not None and not per_iteration:
        first = (iteration - 1) * data.prompts_per_iteration
        if first >= len(rows):
            raise UserError(f"{source} has {len(rows)} prompts, too few for iteration {iteration} with "
                            f"data.prompts_per_iteration={data.prompts_per_iteration}; lower it or add prompts")
        rows = rows.select(range(first, min(first + data.prompts_per_iteration, len(rows))))
    elif data.prompts_per_iteration is not None:
        rows = rows.select(range(min(data.prompts_per_iteration, len(rows))))
    prompt_set = render_prompts(rows, data.prompt_column, source, tokenizer, data.max_prompt_tokens, first)
    if not prompt_set.prompts:
        raise UserError(f"no usable prompts for iteration {iteration} in {source} ({prompt_set.skipped_too_long} "
                        f"over data.max_prompt_tokens={data.max_prompt_tokens}); add prompts or raise the limit")
    return prompt_set


def evaluation_prompts(cfg, tokenizer) -> list[Prompt]:
    """The fixed prompts every iteration is evaluated on: the held-out set, or else the head of iteration 1's."""
    if cfg.eval.prompts is None:
        return iteration_prompts(cfg.data, 1, tokenizer, cfg.seed).prompts[:cfg.eval.num_prompts]
    rows = load_rows(cfg.eval.prompts, cfg.eval.split)
    rows = rows.select(range(min(cfg.eval.num_prompts, len(rows))))
    prompt_set = render_prompts(rows, cfg.eval.prompt_column, cfg.eval.prompts, tokenizer, cfg.data.max_prompt_tokens)
    if not prompt_set.prompts:
        raise UserError(f"no usable evaluation prompts in {cfg.eval.prompts}; add prompts or raise "
                        f"data.max_prompt_tokens")
    return prompt_set.prompts


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
