"""Data in: prompt sets (loaded through HF `datasets`, rendered with the policy's chat template, sliced per
iteration) and, for offline DPO, the pairs of a preference dataset.

    load_preference_pairs("Magpie-Align/MagpieLM-DPO-Data-v0.1", "train", tokenizer, max_prompt_tokens=2048)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlhf_loop.common import console
from rlhf_loop.common.chat import assistant_turn, chat_token_ids
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.records import Messages, Pair, Prompt, Response

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


def require_columns(rows, columns: Sequence[str], missing_text: Callable[[list[str]], str], fix: str) -> None:
    """Refuse a dataset without `columns`; the error says what is missing (`missing_text` of the missing columns),
    lists the columns there are, and ends with `fix`."""
    missing = [column for column in columns if column not in rows.column_names]
    if missing:
        raise UserError(f"{missing_text(missing)} (columns: {', '.join(rows.column_names)}); {fix}")


def as_messages(value: Any) -> Messages | None:
    """A cell as chat messages: a list of {"role", "content"} dicts, or a plain string made a user turn; None for
    anything else."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


def render_prompts(rows, column: str, source: str, tokenizer, max_tokens: int, first_index: int = 0,
                   column_key: str = "data.prompt_column", environment: str | None = None) -> PromptSet:
    """Render each row's prompt with the chat template; skip (and count) those longer than max_tokens. Errors name
    `column_key`, the config key that chose the column. With an `environment` (environment.factory) the prompt is
    the first messages its reset(row) gives, rendered with its tools, and the prompt's meta is the whole row (the
    engines reset with it)."""
    reset = _environment_reset(environment) if environment is not None else None
    if reset is None:
        require_columns(rows, [column], lambda _: f"prompt column {column!r} is not in {source}",
                        f"set {column_key} to one of them")
    prompts, skipped = [], 0
    for offset, row in enumerate(rows):
        tools = None
        if reset is not None:
            meta = {key: value for key, value in row.items() if _is_json(value)}
            messages, tools = reset(meta)
        else:
            messages = as_messages(row[column])
            meta = {key: value for key, value in row.items() if key != column and _is_json(value)}
        if messages is None:
            raise UserError(f"column {column!r} of {source} holds {type(row[column]).__name__} values; it must hold "
                            f"strings or lists of {{'role', 'content'}} messages: set {column_key} to such a column")
        token_ids = chat_token_ids(tokenizer, messages, add_generation_prompt=True, tools=tools)
        if len(token_ids) > max_tokens:
            skipped += 1
            continue
        prompts.append(Prompt(index=first_index + offset, messages=messages, token_ids=token_ids, meta=meta,
                              tools=tools))
    return PromptSet(prompts, skipped)


def _environment_reset(reference: str) -> Callable[[dict[str, Any]], tuple[Messages, list[dict] | None]]:
    """A row's first messages and tools from the environment named by environment.factory (a fresh one per row)."""
    from rlhf_loop.common.environments import environment_tools, first_messages, load_environment

    factory = load_environment(reference)

    def reset(row: dict[str, Any]) -> tuple[Messages, list[dict] | None]:
        environment = factory()
        return first_messages(environment, row, reference), environment_tools(environment, reference)

    return reset


def iteration_prompts(data, iteration: int, tokenizer, seed: int, environment: str | None = None) -> PromptSet:
    """The prompts of one iteration (1-based): its own dataset, or its slice of the shared one; `environment`
    (environment.factory) makes each prompt from its row."""
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
    prompt_set = render_prompts(rows, data.prompt_column, source, tokenizer, data.max_prompt_tokens, first,
                                environment=environment)
    if not prompt_set.prompts:
        raise UserError(f"no usable prompts for iteration {iteration} in {source} ({prompt_set.skipped_too_long} "
                        f"over data.max_prompt_tokens={data.max_prompt_tokens}); add prompts or raise the limit")
    return prompt_set


def evaluation_prompts(cfg, tokenizer) -> list[Prompt]:
    """The held-out prompts (eval.prompts) every iteration is evaluated on; none without eval.prompts."""
    if cfg.eval.prompts is None:
        return []
    rows = load_rows(cfg.eval.prompts, cfg.eval.split)
    rows = rows.select(range(min(cfg.eval.num_prompts, len(rows))))
    prompt_set = render_prompts(rows, cfg.eval.prompt_column, cfg.eval.prompts, tokenizer, cfg.data.max_prompt_tokens,
                                column_key="eval.prompt_column", environment=cfg.environment.factory)
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


# ---- offline DPO: a preference dataset in -------------------------------------------------------------------------

@dataclass(frozen=True)
class PreferencePairs:
    pairs: list[Pair]
    skipped_too_long: int  # rows whose prompt is over the token limit, left out and counted


def load_preference_pairs(source: str, split: str, tokenizer, max_prompt_tokens: int) -> PreferencePairs:
    """Pairs from a preference dataset (hub name, local .json/.jsonl/.parquet, or a save_to_disk directory),
    rendered with the policy tokenizer's chat template.

    Accepted rows: `chosen`/`rejected` conversations ending in an assistant turn, the prompt being the turns before it
    (a `prompt` column is then ignored); or `chosen`/`rejected` holding only the assistant turn (a message list, or
    a string) after a `prompt` column (a message list, or a string made into one user turn). Optional
    `score_chosen`/`score_rejected` columns become the pair's scores (NaN without them)."""
    rows = load_preference_rows(source, split)
    pairs, skipped = [], 0
    for index, row in enumerate(tqdm(rows, desc=f"pairs from {source}", unit="row", leave=False,
                                     file=console.stream())):
        prompt, chosen, rejected = conversation_parts(row, index, source)
        scores = optional_score(row, "score_chosen"), optional_score(row, "score_rejected")
        pair = render_pair(tokenizer, index, prompt, (chosen, rejected), scores, source)
        if len(pair.prompt_token_ids) > max_prompt_tokens:
            skipped += 1
            continue
        pairs.append(pair)
    if not pairs:
        raise UserError(f"no usable pairs in {source} ({skipped} prompts over {max_prompt_tokens} tokens); "
                        f"add rows or raise the prompt limit")
    return PreferencePairs(pairs, skipped)


def optional_score(row: dict[str, Any], column: str) -> float:
    return math.nan if row.get(column) is None else float(row[column])


def load_preference_rows(source: str, split: str):
    """The rows of pairs.dataset, refused without chosen and rejected columns."""
    if Path(source).is_dir():
        import datasets

        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{source} has no split {split!r} (splits: {', '.join(loaded)}); "
                                f"set pairs.dataset_split")
            loaded = loaded[split]
        rows = loaded
    else:
        rows = load_rows(source, split)
    require_columns(rows, ("chosen", "rejected"),
                    lambda missing: f"pairs.dataset {source} lacks the column(s) {', '.join(missing)}",
                    "it needs chosen and rejected conversations")
    return rows


def load_sft_conversations(sft) -> list[Any]:
    """The conversations of sft.dataset (its sft.messages_column)."""
    rows = load_rows(sft.dataset, "train")
    require_columns(rows, [sft.messages_column],
                    lambda _: f"sft.messages_column {sft.messages_column!r} is not in {sft.dataset}",
                    "set it to the column holding the conversations")
    return rows[sft.messages_column]


def conversation_parts(row: dict[str, Any], index: int, source: str) -> tuple[Messages, str, str]:
    """(prompt messages, chosen text, rejected text) of one dataset row."""
    prompt, chosen = split_conversation(row, "chosen", index, source)
    rejected_prompt, rejected = split_conversation(row, "rejected", index, source)
    if rejected_prompt != prompt:
        raise UserError(f"row {index} of {source}: chosen and rejected continue different conversations; "
                        f"a preference pair needs one shared prompt")
    return prompt, chosen, rejected


def split_conversation(row: dict[str, Any], column: str, index: int, source: str) -> tuple[Messages, str]:
    value = row[column]
    if isinstance(value, str):
        return prompt_column(row, column, index, source), value
    turns = row_messages(value, column, index, source)
    if not turns or turns[-1]["role"] != "assistant":
        raise UserError(f"row {index} of {source}: {column} must end with an assistant turn, got roles "
                        f"{[turn['role'] for turn in turns]}")
    prompt = turns[:-1] or prompt_column(row, column, index, source)
    return prompt, turns[-1]["content"]


def prompt_column(row: dict[str, Any], column: str, index: int, source: str) -> Messages:
    """The `prompt` cell, for rows whose `column` holds only the response."""
    if row.get("prompt") is None:
        raise UserError(f"row {index} of {source}: {column} holds only a response and there is no prompt column; "
                        f"give a prompt column or full conversations in chosen and rejected")
    return row_messages(row["prompt"], "prompt", index, source)


def row_messages(value: Any, column: str, index: int, source: str) -> Messages:
    turns = as_messages(value)
    if turns is None:
        raise UserError(f"row {index} of {source}: {column} holds {type(value).__name__}; it must be a string or a "
                        f"list of {{'role', 'content'}} messages")
    return turns


def render_pair(tokenizer, index: int, prompt: Messages, responses: tuple[str, str], scores: tuple[float, float],
                source: str) -> Pair:
    """The prompt rendered with the generation prompt appended, as for generated pairs, and each response as the
    tokens the chat template appends for the assistant turn, end-of-turn token included."""
    from policy.sft import example_from_messages

    chosen, rejected = responses
    try:
        chosen_example = example_from_messages(tokenizer, [*prompt, assistant_turn(chosen)])
        rejected_example = example_from_messages(tokenizer, [*prompt, assistant_turn(rejected)])
    except ValueError as e:
        raise UserError(f"row {index} of {source}: {e}") from None
    return Pair(
        prompt_index=index,
        prompt_messages=prompt,
        prompt_token_ids=chosen_example.prompt_token_ids,
        chosen=Response(chosen, chosen_example.response_token_ids, "stop"),
        rejected=Response(rejected, rejected_example.response_token_ids, "stop"),
        chosen_score=scores[0],
        rejected_score=scores[1],
    )
