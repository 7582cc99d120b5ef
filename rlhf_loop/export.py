"""Preference data in and out: an iteration's policy and pairs for use elsewhere, and offline DPO pairs in.

    export_iteration("runs/x", 2, "out/")            # out/policy (HF model) + out/pairs (HF dataset)
    write_preference_dataset(pairs, path, "parquet", test_fraction=0.02, seed=0, push_to_hub=None)
    load_preference_pairs("Magpie-Align/MagpieLM-DPO-Data-v0.1", "train", tokenizer, max_prompt_tokens=2048)

Exported pairs use TRL's conversational preference format with an explicit prompt: `prompt` holds the conversation
so far, `chosen` and `rejected` hold only the assistant turn. TRL keeps a conversational `prompt` column as is and
appends `chosen`/`rejected` to it (trl.data_utils.maybe_extract_prompt), so completions that repeated the prompt
would be trained on it twice.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlhf_loop.errors import UserError
from rlhf_loop.records import Messages, Pair, Response, pair_from_json
from rlhf_loop.rundir import Manifest, RunDir, read_jsonl

EXPORT_FORMATS = ("disk", "parquet")
SPLITS = ("train", "test")


# ---- Pair -> dataset row --------------------------------------------------------------------------------------------

def preference_row(pair: Pair) -> dict[str, Any]:
    return {
        "prompt": pair.prompt_messages,
        "chosen": [assistant_turn(pair.chosen.text)],
        "rejected": [assistant_turn(pair.rejected.text)],
        "score_chosen": pair.chosen_score,
        "score_rejected": pair.rejected_score,
    }


def assistant_turn(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def preference_dataset(pairs: Sequence[Pair]):
    """The pairs as a HF Dataset with fixed column types, so an iteration without pairs still has the columns."""
    from datasets import Dataset, Features, Value

    message = {"role": Value("string"), "content": Value("string")}
    features = Features({"prompt": [message], "chosen": [message], "rejected": [message],
                         "score_chosen": Value("float64"), "score_rejected": Value("float64")})
    rows = [preference_row(pair) for pair in pairs]
    return Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)


# ---- export of a finished iteration --------------------------------------------------------------------------------

def export_iteration(run_dir: str, iteration: int, to: str) -> None:
    """Copy iteration `iteration`'s policy (HF format) to TO/policy and its pairs (HF dataset) to TO/pairs."""
    run = RunDir.existing(run_dir)
    manifest = Manifest.load(run)
    export_unit, pairs_unit = f"iter_{iteration:03d}/export", f"iter_{iteration:03d}/pairs"
    if not manifest.done(export_unit) or not manifest.done(pairs_unit):
        finished = sorted(int(unit[5:8]) for unit in manifest.units if unit.endswith("/export"))
        raise UserError(f"iteration {iteration} of {run_dir} has not exported its policy yet (finished: "
                        f"{', '.join(map(str, finished)) or 'none'}); pick a finished one or resume the run")
    policy = run.root / manifest.info(export_unit)["path"]
    if not (policy / "config.json").is_file() or not any(policy.glob("*.safetensors")):
        raise UserError(f"{policy} lacks config.json or safetensors weights though the manifest records it as "
                        f"exported; it was changed after the run wrote it")
    pairs = [pair_from_json(row) for row in read_jsonl(manifest.verified_file(pairs_unit))]
    destination = Path(to)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise UserError(f"{destination} already exists and is not empty; pick a new --to directory")
    with staged_directory(destination) as staging:
        shutil.copytree(policy, staging / "policy")
        dataset = preference_dataset(pairs)
        dataset.save_to_disk(str(staging / "pairs"), num_shards=shard_count(dataset))


@contextmanager
def staged_directory(destination: Path) -> Iterator[Path]:
    """A temporary sibling of `destination`, renamed onto it only when the block succeeds: readers see the whole
    result or nothing. An existing `destination` is replaced."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()  # not mkdtemp: its 0700 mode would stay on the result
    try:
        yield staging
        if destination.is_dir() and any(destination.iterdir()):
            shutil.rmtree(destination)
        os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- the loop's per-iteration DPO dataset ---------------------------------------------------------------------------

def write_preference_dataset(pairs: Sequence[Pair], out: Path, format: str, test_fraction: float, seed: int,
                             push_to_hub: str | None) -> Path:
    """The pairs as a DatasetDict with "train" and "test" splits, in `out`: save_to_disk ("disk") or one
    SPLIT.parquet per split ("parquet"); pushed to the hub repo `push_to_hub` when given.

    The test split takes ceil(test_fraction x pairs) pairs, drawn with `seed`, but never every pair. An empty split
    gets no parquet file: `datasets.load_dataset(out)` fails on an empty one."""
    from datasets import DatasetDict

    if format not in EXPORT_FORMATS:
        raise ValueError(f"pairs.export_format {format!r} cannot be written; use one of {list(EXPORT_FORMATS)}")
    dataset = preference_dataset(pairs)
    train, test = split_indices(len(dataset), test_fraction, seed)
    splits = DatasetDict({"train": dataset.select(train), "test": dataset.select(test)})
    out = Path(out)
    with staged_directory(out) as staging:
        if format == "disk":
            splits.save_to_disk(str(staging), num_shards={name: shard_count(split) for name, split in splits.items()})
        else:
            for name in SPLITS:
                if len(splits[name]):
                    splits[name].to_parquet(str(staging / f"{name}.parquet"))
    if push_to_hub is not None:
        splits.push_to_hub(push_to_hub)
    return out


def shard_count(dataset) -> int | None:
    """One shard for an empty dataset (datasets writes none by itself, and then cannot load it back), else
    datasets' own choice."""
    return None if len(dataset) else 1


def split_indices(count: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) row indices, each in dataset order."""
    test_size = min(math.ceil(test_fraction * count), count - 1) if count > 1 else 0
    test = set(random.Random(seed).sample(range(count), test_size))
    return [i for i in range(count) if i not in test], sorted(test)


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
    missing = [column for column in ("chosen", "rejected") if column not in rows.column_names]
    if missing:
        raise UserError(f"pairs.dataset {source} lacks the column(s) {', '.join(missing)} (columns: "
                        f"{', '.join(rows.column_names)}); it needs chosen and rejected conversations")
    pairs, skipped = [], 0
    for index, row in enumerate(tqdm(rows, desc=f"pairs from {source}", unit="row", leave=False)):
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
    from rlhf_loop.data import load_rows

    if Path(source).is_dir():
        import datasets

        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{source} has no split {split!r} (splits: {', '.join(loaded)}); "
                                f"set pairs.dataset_split")
            return loaded[split]
        return loaded
    return load_rows(source, split)


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
    turns = messages(value, column, index, source)
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
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return messages(prompt, "prompt", index, source)


def messages(value: Any, column: str, index: int, source: str) -> Messages:
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise UserError(f"row {index} of {source}: {column} holds {type(value).__name__}; it must be a string or a list "
                    f"of {{'role', 'content'}} messages")


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
