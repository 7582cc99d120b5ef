"""What `rlhf-loop report` shows, read from a run directory: only the units its manifest records as finished.

A run that is still going, or was stopped, gives what it has so far. A recorded file that is missing or unreadable
is left out with a note for the page, never an exception: the report is for looking at runs in any state.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

from rlhf_loop.common import records
from rlhf_loop.common.records import Pair
from rlhf_loop.rundir.manifest import Manifest, RunDir
from rlhf_loop.common.files import read_jsonl
from rlhf_loop.driver.stages import EVAL_INITIAL

_ITERATION_UNIT = re.compile(r"iter_(\d+)/")
_UNREADABLE = (OSError, ValueError, KeyError, TypeError)  # a file gone, cut short, or not of the record's shape

Record = TypeVar("Record")


@dataclass
class TrainChunk:
    """One checkpointed chunk of DPO steps, as the manifest recorded it."""

    iteration: int
    global_step: int  # optimizer steps over the whole run at the chunk's end
    stats: dict[str, float]  # loss, reward_accuracy, margin, chosen_reward, rejected_reward, learning_rate, steps


@dataclass
class IterationData:
    iteration: int
    finished: bool
    scores: list[float] = field(default_factory=list)  # every scored response of the recorded score shards
    response_tokens: list[int] = field(default_factory=list)  # their lengths, in the same order
    score_shards: int = 0
    score_shards_total: int | None = None
    pairs: list[Pair] | None = None  # None: the pairs unit is not recorded (or its file is unreadable)
    train_chunks: list[TrainChunk] = field(default_factory=list)
    eval_metrics: dict[str, float] | None = None
    metrics: dict[str, float] | None = None  # iter_NNN/metrics.json: only once the iteration is finished


@dataclass
class RunData:
    root: Path
    config_text: str
    iterations_planned: int | None
    initial_eval: dict[str, float] | None
    iterations: list[IterationData]
    notes: list[str]  # what is missing or unreadable, for the page

    @property
    def finished(self) -> list[IterationData]:
        return [data for data in self.iterations if data.finished]


def read_run(root: str | Path) -> RunData:
    """Everything the report shows; a directory that is not a run raises the usual one-line UserError."""
    run_dir = RunDir.existing(root)
    units = Manifest.load(run_dir).units
    notes: list[str] = []
    config_text, planned = _read_config(run_dir, notes)
    numbers = sorted({int(match.group(1)) for unit in units if (match := _ITERATION_UNIT.match(unit))})
    iterations = []
    step_offset = 0
    for number in numbers:
        data = _read_iteration(run_dir, units, number, step_offset, notes)
        step_offset = data.train_chunks[-1].global_step if data.train_chunks else step_offset
        iterations.append(data)
        if not data.finished:
            notes.append(f"iteration {number} is not finished (the run is still going, or was stopped): "
                         + _missing_parts(data))
    if planned is not None and len(numbers) < planned:
        first = (numbers[-1] if numbers else 0) + 1
        notes.append(f"iterations {first} to {planned} of {planned} have not started" if first < planned
                     else f"iteration {planned} of {planned} has not started")
    initial_eval = units.get(EVAL_INITIAL, {}).get("metrics")
    if initial_eval is None and numbers:
        notes.append("no evaluation of pi_0 (eval_initial) recorded: curves start at iteration 1")
    return RunData(run_dir.root, config_text, planned, initial_eval, iterations, notes)


def _read_config(run_dir: RunDir, notes: list[str]) -> tuple[str, int | None]:
    try:
        text = run_dir.config_path.read_text(encoding="utf-8")
        planned = OmegaConf.create(text).get("iterations")
    except Exception as e:  # noqa: BLE001 - any YAML error: the report still shows what the manifest has
        notes.append(f"config.yaml could not be read ({type(e).__name__}: {e}); the planned iteration count is unknown")
        return "", None
    return text, planned if isinstance(planned, int) else None


def _read_iteration(run_dir: RunDir, units: dict[str, dict[str, Any]], iteration: int, step_offset: int,
                    notes: list[str]) -> IterationData:
    prefix = f"iter_{iteration:03d}/"
    data = IterationData(iteration, finished=prefix + "done" in units)

    shard_units = sorted(unit for unit in units if unit.startswith(prefix + "scores/"))
    data.score_shards = len(shard_units)
    data.score_shards_total = units[shard_units[0]].get("of_shards") if shard_units else None
    for unit in shard_units:
        for scored in _unit_records(run_dir, units, unit, records.scored_from_json, notes) or []:
            data.scores += scored.scores
            data.response_tokens += [len(response.token_ids) for response in scored.rollout.responses]

    if prefix + "pairs" in units:
        data.pairs = _unit_records(run_dir, units, prefix + "pairs", records.pair_from_json, notes)

    for unit in sorted(unit for unit in units if unit.startswith(prefix + "train/step_")):
        info = units[unit]
        stats = {key: value for key, value in info.items() if isinstance(value, (int, float))}
        step = int(unit.rsplit("_", 1)[1])
        data.train_chunks.append(TrainChunk(iteration, step_offset + step, stats))

    data.eval_metrics = units.get(prefix + "eval", {}).get("metrics")
    if data.finished:
        path = run_dir.iteration(iteration) / "metrics.json"
        try:
            data.metrics = json.loads(path.read_text(encoding="utf-8"))
        except _UNREADABLE as e:
            notes.append(f"{path.relative_to(run_dir.root)} could not be read ({e}); iteration {iteration} is "
                         f"missing from the metrics table and the stage times")
    return data


def _unit_records(run_dir: RunDir, units: dict[str, dict[str, Any]], unit: str,
                  decode: Callable[[dict], Record], notes: list[str]) -> list[Record] | None:
    """The records of the one JSONL file a finished unit wrote, or None (noted) when it cannot be read."""
    try:
        (entry,) = units[unit]["files"]
        return [decode(row) for row in read_jsonl(run_dir.root / entry["path"])]
    except _UNREADABLE as e:
        notes.append(f"{unit}: its file could not be read ({type(e).__name__}: {e}); left out")
        return None


def _missing_parts(data: IterationData) -> str:
    parts = []
    if data.score_shards_total is None:
        parts.append("no score shard yet")
    elif data.score_shards < data.score_shards_total:
        parts.append(f"{data.score_shards} of {data.score_shards_total} score shards")
    parts.append("no pairs yet" if data.pairs is None else f"{len(data.pairs)} pairs")
    steps = sum(chunk.stats.get("steps", 0) for chunk in data.train_chunks)
    parts.append(f"{steps} DPO steps so far" if data.train_chunks else "no DPO steps yet")
    parts.append("evaluated" if data.eval_metrics is not None else "not evaluated yet")
    return ", ".join(parts) + "; its metrics row and stage times will appear once it finishes"
