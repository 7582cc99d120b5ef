"""The run directory: every stage's output, written atomically, and the manifest of finished units of work.

    RUN_DIR/
      config.yaml      the resolved config, frozen at start; `resume` reads it from here
      manifest.json    finished units ("iter_001/generate/shard_00000", "iter_001/pairs", ...), written last
      metrics.jsonl    one line per finished iteration
      iter_001/        rollouts/ scores/ pairs.jsonl learner/ policy/ eval.jsonl metrics.json

A unit counts as finished only once the manifest says so; its files are written (temp file, fsync, rename) before
the manifest records it, so a crash at any point leaves either a finished unit or one that is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_loop.errors import UserError

MANIFEST_VERSION = 1
# Fault injection for the kill-and-resume tests: "UNIT" kills the process right after UNIT is recorded,
# "UNIT:before" right before (its files written, the manifest not yet updated).
KILL_AT_ENV = "RLHF_LOOP_KILL_AT"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def iteration(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration:03d}"

    @staticmethod
    def create(root: str | os.PathLike, overwrite: bool) -> RunDir:
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            if not overwrite:
                raise UserError(f"run directory {root} already exists; resume it with `rlhf-loop resume {root}`, "
                                f"pick another --run-dir, or pass --overwrite to start it afresh")
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        return RunDir(root)

    @staticmethod
    def existing(root: str | os.PathLike) -> RunDir:
        root = Path(root)
        run_dir = RunDir(root)
        if not run_dir.manifest_path.is_file() or not run_dir.config_path.is_file():
            raise UserError(f"{root} is not a run directory (no manifest.json and config.yaml); "
                            f"start a run there with `rlhf-loop run CONFIG --run-dir {root}`")
        return run_dir


class Manifest:
    """What is finished, by unit name, with the files each unit wrote (path relative to the run dir, size, sha256).

    Every `record` rewrites manifest.json atomically, so the file on disk is always a consistent picture.
    """

    def __init__(self, run_dir: RunDir, units: dict[str, dict[str, Any]]):
        self.run_dir = run_dir
        self.units = units

    @staticmethod
    def load(run_dir: RunDir) -> Manifest:
        if not run_dir.manifest_path.exists():
            manifest = Manifest(run_dir, {})
            manifest._write()
            return manifest
        try:
            data = json.loads(run_dir.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{run_dir.manifest_path} is not valid JSON ({e}); it is written atomically, "
                            f"so it was edited by hand: restore it") from None
        return Manifest(run_dir, data["units"])

    def done(self, unit: str) -> bool:
        return unit in self.units

    def info(self, unit: str) -> dict[str, Any]:
        return self.units[unit]

    def record(self, unit: str, files: Iterable[Path] = (), **info: Any) -> None:
        """Mark `unit` finished; `files` (already written) are checksummed so resume can trust them."""
        entry = dict(info)
        entry["files"] = [
            {"path": str(path.relative_to(self.run_dir.root)), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for path in files
        ]
        _maybe_kill(f"{unit}:before")
        self.units[unit] = entry
        self._write()
        _maybe_kill(unit)

    def verified_file(self, unit: str) -> Path:
        """The single file a finished unit wrote, after checking it is unchanged since it was recorded."""
        (entry,) = self.units[unit]["files"]
        path = self.run_dir.root / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise UserError(f"{path} differs from what manifest.json recorded for {unit}; it was changed or removed "
                            f"after the run wrote it: restore it, or delete the '{unit}' entry to redo that unit")
        return path

    def _write(self) -> None:
        atomic_write_json(self.run_dir.manifest_path, {"version": MANIFEST_VERSION, "units": self.units})


def _maybe_kill(point: str) -> None:
    if os.environ.get(KILL_AT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
