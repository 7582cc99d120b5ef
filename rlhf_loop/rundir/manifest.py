"""The run directory: every stage's output, written atomically, and the manifest of finished units of work.

    RUN_DIR/
      config.yaml        the resolved config, frozen at start; `resume` reads it from here
      manifest.json      finished units ("iter_001/rollouts/shard_00000", "iter_001/pairs", ...), written last
      manifest.json.prev the manifest before its last record: what a damaged manifest.json is recovered from
      heartbeat.json     the running process (pid, host, stage), rewritten while it lives; `status` reads it
      journal.jsonl      every recording of a unit, by every process, appended: a unit appears once
      placement.json     per role: the placement group asked for, and where each actor of the last process ran
                         (node id, address, pid, bundle)
      metrics.jsonl      one line per finished iteration
      eval_initial.jsonl the evaluation of pi_0;  sft/  the warm start;  wandb/  wandb's files
      iter_001/          rollouts/ scores/ pairs.jsonl learner/ policy/ eval.jsonl metrics.json

A unit counts as finished only once the manifest says so; its files are written (temp file, fsync, rename) before
the manifest records it, with their sizes and sha256, so a crash at any point leaves either a finished unit or one
that is redone, and a file damaged later is found before it is trusted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_loop.common.console import say
from rlhf_loop.common.errors import UserError
from rlhf_loop.common.faults import maybe_kill
from rlhf_loop.common.files import atomic_write_bytes, sha256_files

MANIFEST_VERSION = 1
# The units of an iteration, in the order the loop runs them (each optional one only when the config asks for it).
ITERATION_STAGES = ("rollouts", "scores", "pairs", "pairs_dataset", "train", "export", "sync", "eval", "done")
# What a run writes at its top level (the layout above, and atomic writes' temp files); `--overwrite` deletes a
# directory only when it holds nothing else, so a mistyped --run-dir never costs anyone their files.
RUN_ENTRIES = re.compile(r"config\.yaml|manifest\.json(\.prev)?|heartbeat\.json|metrics\.jsonl|eval_initial\.jsonl"
                         r"|placement\.json|journal\.jsonl|sft|wandb|report|logs|iter_\d{3,}|\..+\.tmp")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def previous_manifest_path(self) -> Path:
        return self.root / "manifest.json.prev"

    @property
    def journal_path(self) -> Path:
        return self.root / "journal.jsonl"

    @property
    def heartbeat_path(self) -> Path:
        return self.root / "heartbeat.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def iteration(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration:03d}"

    @staticmethod
    def create(root: str | os.PathLike, overwrite: bool) -> RunDir:
        """A new run directory with a fresh manifest (and run id). An existing non-empty one is replaced only with
        `overwrite`, and only when it is a run directory and nothing else (see `RUN_ENTRIES`)."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise UserError(f"{root} is a file, not a directory; pick another --run-dir")
        if root.is_dir() and any(root.iterdir()):
            foreign = not_a_run_dir(root)
            if foreign:
                raise UserError(f"{root} already exists and is not a run directory ({foreign}); pick another "
                                f"--run-dir (--overwrite deletes only a run directory and nothing else)")
            if not overwrite:
                raise UserError(f"run directory {root} already exists; resume it with `rlhf-loop resume {root}`, "
                                f"pick another --run-dir, or pass --overwrite to start it afresh")
            shutil.rmtree(root)
            say(f"rlhf-loop: --overwrite: deleted the previous run in {root}")
        root.mkdir(parents=True, exist_ok=True)
        run_dir = RunDir(root.absolute())  # the actors get paths in it: a relative one means another place on a node
        Manifest.load(run_dir)  # from here on the directory is recognisably a run's, and has its run id
        return run_dir

    @staticmethod
    def existing(root: str | os.PathLike) -> RunDir:
        root = Path(root)
        run_dir = RunDir(root.absolute())
        has_manifest = run_dir.manifest_path.is_file() or run_dir.previous_manifest_path.is_file()
        if not has_manifest or not run_dir.config_path.is_file():
            raise UserError(f"{root} is not a run directory (no manifest.json and config.yaml); "
                            f"start a run there with `rlhf-loop run CONFIG --run-dir {root}`")
        return run_dir


def not_a_run_dir(root: Path) -> str | None:
    """Why `root` is not a run directory of ours (None when it is): it must be a real directory holding
    config.yaml and a manifest in our format (or its previous generation), and nothing a run does not write."""
    if root.is_symlink():
        return "it is a symbolic link"
    foreign = sorted(entry.name for entry in root.iterdir() if not RUN_ENTRIES.fullmatch(entry.name))
    if foreign:
        return f"it holds {foreign[0]!r}, which no run writes"
    run_dir = RunDir(root)
    if not run_dir.config_path.is_file():
        return "no config.yaml"
    for path in (run_dir.manifest_path, run_dir.previous_manifest_path):
        try:
            _parse_manifest(path.read_bytes())
            return None
        except (OSError, ValueError):
            continue
    return "no manifest.json in the format rlhf-loop writes"


def _parse_manifest(raw: bytes) -> dict[str, Any]:
    """The manifest's data; ValueError when the bytes are not a manifest (truncated, damaged, someone else's)."""
    data = json.loads(raw)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not (isinstance(data, dict) and isinstance(data.get("version"), int) and isinstance(data.get("units"), dict)):
        raise ValueError("not an object with 'version' and 'units'")
    return data


class Manifest:
    """What is finished, by unit name, with the files each unit wrote (path relative to the run dir, size, sha256);
    also the run's id (its wandb run) and the fingerprints of its inputs.

    Every `record` rewrites manifest.json atomically, so the file on disk is always a consistent picture, and
    first keeps the generation it replaces as manifest.json.prev, so even a damaged manifest.json costs at most
    the last record.

    Stages running at once (rlhf_loop.driver.sampler) record from several threads: changes are made under a lock and
    replace `units` with a new dict, so a reader iterating the old one never sees it change under it.
    """

    def __init__(self, run_dir: RunDir, data: dict[str, Any], written: bytes | None = None):
        self.run_dir = run_dir
        self.units: dict[str, dict[str, Any]] = data["units"]
        self.run_id: str | None = data.get("run_id")  # None for runs started before run ids existed
        self.fingerprints: dict[str, Any] | None = data.get("fingerprints")
        self._written = written  # the last good generation on disk: what manifest.json.prev receives next
        self._lock = threading.RLock()

    @staticmethod
    def load(run_dir: RunDir) -> Manifest:
        current, previous = run_dir.manifest_path, run_dir.previous_manifest_path
        if not current.exists() and not previous.exists():
            manifest = Manifest(run_dir, {"units": {}, "run_id": uuid.uuid4().hex})
            manifest._write()
            return manifest
        try:
            raw = current.read_bytes()
            data = _parse_manifest(raw)
        except (OSError, ValueError) as e:
            damage = "it is missing" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
            try:
                raw = previous.read_bytes()
                data = _parse_manifest(raw)
            except (OSError, ValueError):
                raise UserError(f"{current} is damaged ({damage}) and {previous.name} cannot replace it; restore "
                                f"manifest.json from a backup, or delete {run_dir.root} and start the run again") \
                    from None
            say(f"rlhf-loop: {current} is damaged ({damage}); recovered its previous generation from "
                f"{previous.name}: the unit recorded last is redone")
        version = data["version"]
        if version != MANIFEST_VERSION:
            fix = ("upgrade rlhf-loop to resume it" if version > MANIFEST_VERSION
                   else "resume it with the rlhf-loop version that started it")
            raise UserError(f"{current} is manifest version {version}, but this rlhf-loop reads only version "
                            f"{MANIFEST_VERSION}; {fix}")
        return Manifest(run_dir, data, raw)

    def done(self, unit: str) -> bool:
        return unit in self.units

    def info(self, unit: str) -> dict[str, Any]:
        return self.units[unit]

    def record(self, unit: str, files: Iterable[Path] = (), tree: Path | None = None, **info: Any) -> None:
        """Mark `unit` finished; `files` and every file under `tree` (a checkpoint, an exported policy), already
        written, are checksummed so resume can trust them."""
        paths = list(files)
        if tree is not None:
            tree_files = sorted(path for path in Path(tree).rglob("*") if path.is_file())
            if not tree_files:  # it would "verify" for ever, and a resume would trust nothing
                raise UserError(f"{tree} holds no files after {unit} wrote it: on a cluster, the run directory must "
                                f"be one shared filesystem that every node mounts at the same path (docs/cluster.md)")
            paths += tree_files
            info["tree"] = str(Path(tree).relative_to(self.run_dir.root))
        entry = dict(info)
        entry["files"] = [
            {"path": str(path.relative_to(self.run_dir.root)), "bytes": path.stat().st_size, "sha256": digest}
            for path, digest in zip(paths, sha256_files(paths), strict=True)
        ]
        with self._lock:
            maybe_kill(f"{unit}:before")
            self.units = {**self.units, unit: entry}
            self._write(kill_point=f"{unit}:manifest")
            self._journal(unit)
            maybe_kill(unit)

    def verify_unit(self, unit: str) -> str | None:
        """The first of a finished unit's files that is missing, truncated or corrupt, said in words; None when
        every file is as recorded."""
        entries = self.units[unit].get("files", [])
        for entry in entries:  # sizes first: a truncated file is found without reading anything
            path = self.run_dir.root / entry["path"]
            if not path.is_file():
                return f"{path} is missing"
            size = path.stat().st_size
            if size != entry["bytes"]:
                return (f"{path} is truncated ({size} of {entry['bytes']} bytes)" if size < entry["bytes"]
                        else f"{path} has {size} bytes, not the {entry['bytes']} recorded")
        digests = sha256_files([self.run_dir.root / entry["path"] for entry in entries])
        for entry, digest in zip(entries, digests, strict=True):
            if digest != entry["sha256"]:
                return f"{self.run_dir.root / entry['path']} is corrupt (its sha256 differs from the one recorded)"
        return None

    def verified_file(self, unit: str) -> Path:
        """The single file a finished unit wrote, after checking it is unchanged since it was recorded."""
        (entry,) = self.units[unit]["files"]
        problem = self.verify_unit(unit)
        if problem:
            raise UserError(f"{problem}: it differs from what manifest.json recorded for {unit}, so it was changed "
                            f"after the run wrote it: restore it, or delete the '{unit}' entry to redo that unit")
        return self.run_dir.root / entry["path"]

    def done_and_intact(self, unit: str) -> bool:
        """Whether `unit` is finished with its files as recorded. A unit whose files were damaged is dropped
        (said on stderr) so that it is redone: the policy for shards, pairs and evaluations."""
        if unit not in self.units:
            return False
        problem = self.verify_unit(unit)
        if problem is None:
            return True
        self.drop([unit], problem)
        return False

    def intact_checkpoint(self, kind: str) -> Path | None:
        """The newest checkpoint of a kind ("train/step_", "sft/step_") if its files are as recorded. If they are
        not, the one before it, with the damaged one and every unit after it (computed from it) dropped, said on
        stderr; None when the damaged one was the first. Falling back further would redo most of a run, so when the
        one before is gone or damaged too the resume is refused instead (the stages keep two checkpoints)."""
        units = sorted((unit for unit in self.units if kind in unit), key=unit_order, reverse=True)
        if not units:
            return None
        newest, previous = units[0], units[1] if len(units) > 1 else None
        problem = self.verify_unit(newest)
        if problem is None:
            return self.run_dir.root / self.units[newest]["checkpoint"]
        if previous is not None and self.verify_unit(previous) is not None:
            raise UserError(f"{problem}, and the checkpoint before it ({previous}) is not intact either: restore the "
                            f"damaged file, or start the run again in a new --run-dir")
        self.drop(self.units_from(newest), f"its checkpoint is damaged: {problem}")
        return self.run_dir.root / self.units[previous]["checkpoint"] if previous else None

    def units_from(self, unit: str) -> list[str]:
        """`unit` and every finished unit after it in the order a run does its work."""
        position = _pipeline_position(unit)
        return sorted((u for u in self.units if _pipeline_position(u) >= position), key=_pipeline_position)

    def drop(self, units: Iterable[str], reason: str) -> None:
        """Forget finished units so that they are redone, and say so on stderr."""
        with self._lock:
            dropped = [unit for unit in dict.fromkeys(units) if unit in self.units]
            if not dropped:
                return
            self.units = {unit: info for unit, info in self.units.items() if unit not in dropped}
            self._write()
        after = f" and the {len(dropped) - 1} unit(s) after it" if len(dropped) > 1 else ""
        say(f"rlhf-loop: redoing {dropped[0]}{after}: {reason}")

    def record_fingerprints(self, fingerprints: dict[str, Any]) -> None:
        with self._lock:
            self.fingerprints = fingerprints
            self._write()

    def _write(self, kill_point: str = "") -> None:
        data: dict[str, Any] = {"version": MANIFEST_VERSION, "units": self.units}
        data.update({key: value for key, value in (("run_id", self.run_id), ("fingerprints", self.fingerprints))
                     if value is not None})
        raw = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        if self._written is not None:
            atomic_write_bytes(self.run_dir.previous_manifest_path, self._written)
        maybe_kill(kill_point)  # between the two writes: the kill tests' "UNIT:manifest"
        atomic_write_bytes(self.run_dir.manifest_path, raw)
        self._written = raw

    def _journal(self, unit: str) -> None:
        """One line per recorded unit, appended and never rewritten, by every process of the run: what the chaos
        tests count to show that no finished unit is ever done twice."""
        line = json.dumps({"unit": unit, "pid": os.getpid(), "time": time.time()}) + "\n"
        with open(self.run_dir.journal_path, "a", encoding="utf-8") as journal:
            journal.write(line)
            journal.flush()
            os.fsync(journal.fileno())


def unit_order(name: str) -> tuple:
    """The sort key of unit names and of the paths named after them ("iter_1000/rollouts/shard_00002",
    "iter_999/metrics.json"): their numbers compare as numbers. The padding (three digits for iterations, five for
    shards, six for steps) only makes names line up; as strings, iteration 1000 would sort before 999."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def iteration_of(unit: str) -> int | None:
    """The iteration a unit belongs to ("iter_1000/pairs" -> 1000); None for the units outside iterations."""
    match = re.match(r"iter_(\d+)/", unit)
    return int(match[1]) if match else None


def _pipeline_position(unit: str) -> tuple:
    """Where a unit falls in a run: the SFT warm start, pi_0's evaluation, then each iteration's stages in order;
    names within a stage (shards and steps) in the order they are done."""
    if unit.startswith("sft/"):
        return (0, 1 if unit == "sft/done" else 0, unit_order(unit))
    if unit == "eval_initial":
        return (1,)
    match = re.fullmatch(r"iter_(\d+)/([^/]+)(.*)", unit)
    if match and match[2] in ITERATION_STAGES:
        return (2, int(match[1]), ITERATION_STAGES.index(match[2]), unit_order(match[3]))
    return (3, unit_order(unit))  # a unit this version does not know: assume it depends on everything
