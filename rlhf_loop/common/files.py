"""Files and directories written so that a crash leaves either the old one or the new one: temp file (or staging
directory), fsync of everything in it, rename, fsync of the parent directory. Every artifact of a run is written
through here; read_jsonl and checksums are their counterparts."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file and directory under `root` (and `root`) on disk: a rename makes a tree visible under its final
    name, but only an fsync makes its files' contents and its directory entries survive a power or node loss. Files
    other processes wrote are flushed too: fsync works on the file, whichever descriptor it comes through."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


@contextmanager
def atomic_directory(destination: str | os.PathLike, barrier: Callable[[], None] = lambda: None,
                     owner: bool = True) -> Iterator[Path]:
    """A staging directory `.NAME.partial` beside `destination` to write into; when the block succeeds, its whole
    tree is fsynced and it is renamed onto `destination` (an old one is renamed aside first and then deleted: a
    directory cannot be renamed over a non-empty one), and the parent is fsynced. Readers see the old tree or the
    new one, never a mix; after a crash, at most a leftover `.NAME.partial`, cleared by the next write.

    Several processes (a learner's ranks) may write one directory: each passes `barrier` (all of them wait there)
    and only `owner` (rank 0) creates, fsyncs and renames; the others only write into it."""
    final = Path(destination)
    partial = final.with_name(f".{final.name}.partial")
    if owner:
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash mid-write
        partial.mkdir(parents=True)
    barrier()
    try:
        yield partial
        barrier()
        if owner:
            fsync_tree(partial)
            replaced = final.with_name(f".{final.name}.replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            if final.exists():
                os.replace(final, replaced)
            os.replace(partial, final)
            fsync_dir(final.parent)
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        if owner:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    barrier()


@contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Holds an advisory lock on the file `path` (created if missing): processes that build one cache serialise here,
    one builds and the others wait and then find it built."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# The mode open() would give a new file under this process's umask (read once, at import, while single-threaded).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)  # mkstemp's 0600 would keep the run's files from anyone else
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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


def sha256_files(paths: list[Path]) -> list[str]:
    """Checksums of many files at once: hashlib releases the GIL, so a checkpoint's shards hash in parallel."""
    if len(paths) <= 1:
        return [sha256_file(path) for path in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))
