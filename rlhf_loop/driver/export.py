"""Preference data out: an iteration's policy and pairs for use elsewhere (offline DPO pairs come in through
`rlhf_loop.driver.data.load_preference_pairs`).

    export_iteration("runs/x", 2, "out/")            # out/policy (HF model) + out/pairs (HF dataset)
    write_preference_dataset(pairs, path, "parquet", test_fraction=0.02, seed=0, push_to_hub=None)

Exported pairs use TRL's conversational preference format with an explicit prompt: `prompt` holds the conversation
so far, `chosen` and `rejected` hold only the assistant turn. TRL keeps a conversational `prompt` column as is and
appends `chosen`/`rejected` to it (trl.data_utils.maybe_extract_prompt), so completions that repeated the prompt
would be trained on it twice. An episode's completion holds all its turns (the environment's included).
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_loop.common.chat import assistant_turn
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.records import Messages, Pair, Response, pair_from_json
from rlhf_loop.rundir.manifest import Manifest, RunDir, iteration_of
from rlhf_loop.common.files import atomic_directory, read_jsonl

EXPORT_FORMATS = ("disk", "parquet")
SPLITS = ("train", "test")


# ---- Pair -> dataset row --------------------------------------------------------------------------------------------

def preference_row(pair: Pair) -> dict[str, Any]:
    return {
        "prompt": pair.prompt_messages,
        "chosen": completion(pair.chosen),
        "rejected": completion(pair.rejected),
        "score_chosen": pair.chosen_score,
        "score_rejected": pair.rejected_score,
    }


def completion(response: Response) -> Messages:
    """The response as the turns after the prompt: the assistant turn, or an episode's every turn up to its last
    assistant turn (the environment's final reply after it is left out: the policy never answered it)."""
    if response.episode is None:
        return [assistant_turn(response.text)]
    return [dict(message) for message in response.episode.answered_turns()]


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
        finished = sorted(iteration_of(unit) for unit in manifest.units if unit.endswith("/export"))
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
    with atomic_directory(destination) as staging:
        shutil.copytree(policy, staging / "policy")
        dataset = preference_dataset(pairs)
        dataset.save_to_disk(str(staging / "pairs"), num_shards=shard_count(dataset))


# ---- the loop's per-iteration DPO dataset ---------------------------------------------------------------------------

def write_preference_dataset(pairs: Sequence[Pair], out: Path, format: str, test_fraction: float, seed: int,
                             push_to_hub: str | None, private: bool = True) -> Path:
    """The pairs as a DatasetDict with "train" and "test" splits, in `out`: save_to_disk ("disk") or one
    SPLIT.parquet per split ("parquet"); pushed to the hub repo `push_to_hub` when given (a new repo is private
    unless `private` is false).

    The test split takes ceil(test_fraction x pairs) pairs, drawn with `seed`, but never every pair. An empty split
    gets no parquet file: `datasets.load_dataset(out)` fails on an empty one."""
    from datasets import DatasetDict

    if format not in EXPORT_FORMATS:
        raise ValueError(f"pairs.export_format {format!r} cannot be written; use one of {list(EXPORT_FORMATS)}")
    dataset = preference_dataset(pairs)
    train, test = split_indices(len(dataset), test_fraction, seed)
    splits = DatasetDict({"train": dataset.select(train), "test": dataset.select(test)})
    out = Path(out)
    with atomic_directory(out) as staging:
        if format == "disk":
            splits.save_to_disk(str(staging), num_shards={name: shard_count(split) for name, split in splits.items()})
        else:
            for name in SPLITS:
                if len(splits[name]):
                    splits[name].to_parquet(str(staging / f"{name}.parquet"))
    if push_to_hub is not None:
        splits.push_to_hub(push_to_hub, private=private)
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
