"""The chaos soak's schedule: every recorded unit at each moment, in the order a run reaches them."""

from __future__ import annotations

import random
import sys
from pathlib import Path

from rlhf_loop.common.files import atomic_write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from chaos_soak import candidate_points  # noqa: E402


def test_candidates_cover_every_unit_and_checkpoint_in_run_order(tmp_path):
    units = ["sft/step_000002", "sft/done", "eval_initial", "iter_001/rollouts/shard_00000", "iter_001/train/step_000002"]
    atomic_write_jsonl(tmp_path / "journal.jsonl", ({"unit": unit, "pid": 1, "time": 0.0} for unit in units))
    candidates = candidate_points(tmp_path)
    points = [point for _, _, point in sorted(candidates)]
    assert len(points) == 3 * len(units) + 2  # two checkpoint writes
    assert points[:4] == ["checkpoint:sft/step_000002", "sft/step_000002:before", "sft/step_000002:manifest",
                          "sft/step_000002"]
    assert points[-4:] == ["checkpoint:iter_001/step_000002", "iter_001/train/step_000002:before",
                           "iter_001/train/step_000002:manifest", "iter_001/train/step_000002"]
    # A sorted sample keeps run order, so each kill point is still ahead when the run is resumed.
    schedule = sorted(random.Random(0).sample(candidates, 6))
    assert [position for position, _, _ in schedule] == sorted(position for position, _, _ in schedule)
