"""Atomic directories: the new tree replaces the old one whole, every file and directory in it is fsynced before
the rename (and the parent after it), and a failed write leaves the old tree and no staging directory."""

from __future__ import annotations

import os

import pytest

from rlhf_loop.common import files


def test_a_directory_is_fsynced_whole_then_renamed_over_the_old_one(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    renamed, real_replace = [], os.replace

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(source, destination):
        renamed.append((str(source), str(destination), list(synced)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "policy"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    with files.atomic_directory(target) as staging:
        (staging / "shards").mkdir()
        (staging / "shards" / "a.bin").write_bytes(b"a")  # written as other processes do: no fsync of their own
        (staging / "config.json").write_text("{}")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["config.json", "shards",
                                                                                    "shards/a.bin"]
    assert not list(tmp_path.glob(".policy.*"))
    into_place = next(synced_before for source, destination, synced_before in renamed
                      if destination == str(target))
    staged = str(tmp_path / ".policy.partial")
    assert {f"{staged}/shards/a.bin", f"{staged}/config.json", f"{staged}/shards", staged} <= set(into_place)
    assert synced[-1] == str(tmp_path)  # the rename itself is made durable


def test_a_failed_write_keeps_the_old_tree_and_leaves_no_staging(tmp_path):
    target = tmp_path / "report"
    target.mkdir()
    (target / "index.html").write_text("old")
    with pytest.raises(RuntimeError, match="plot failed"):
        with files.atomic_directory(target) as staging:
            (staging / "index.html").write_text("new")
            raise RuntimeError("plot failed")
    assert (target / "index.html").read_text() == "old" and not list(tmp_path.glob(".report.*"))


def test_every_writer_waits_at_the_barrier_and_only_the_owner_renames(tmp_path):
    waits = []
    target = tmp_path / "checkpoint"
    (tmp_path / ".checkpoint.partial").mkdir()  # the owner made it, as rank 0 does before the first barrier
    with files.atomic_directory(target, barrier=lambda: waits.append("barrier"), owner=False) as staging:
        (staging / "rng_rank1.pt").write_bytes(b"1")
    assert waits == ["barrier"] * 3 and not target.exists()  # rank 0 renames it
