"""scripts/gpu_check.py in its dry mode: every check of the GPU run, on CPU, and a failing check recorded in one line
without ending the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


def test_a_failing_check_is_one_line_in_the_report_and_the_next_check_runs():
    report = {"checks": {}}

    def broken() -> dict:
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    gpu_check.run(report, "broken", broken)
    gpu_check.run(report, "fine", lambda: {"value": 3})
    assert report["checks"]["broken"]["ok"] is False
    assert report["checks"]["broken"]["error"] == "RuntimeError: CUDA out of memory."
    assert report["checks"]["fine"] == {"ok": True, "value": 3, "seconds": report["checks"]["fine"]["seconds"]}


@pytest.mark.integration  # DeepSpeed, in a process of its own
def test_the_dry_mode_runs_every_check_on_cpu(tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--out",
                             str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["device"] == "cpu"
    assert set(report["checks"]) == {"learner float32 zero0", "learner float32 zero3", "learner bfloat16 zero0",
                                     "learner bfloat16 zero3", "hf engine", "reward model", "weight sync broadcast"}
    learners = {name: check for name, check in report["checks"].items() if name.startswith("learner")}
    for name, check in learners.items():
        assert check["weights_dtype"] == ("torch.bfloat16" if "bfloat16" in name else "torch.float32"), name
        assert check["losses"][1] < check["losses"][0], name
        assert check["plan_estimate_mib"] > 0
    # ZeRO-3 on one rank trains as ZeRO-0 does, in each dtype
    for dtype in ("float32", "bfloat16"):
        zero0, zero3 = learners[f"learner {dtype} zero0"], learners[f"learner {dtype} zero3"]
        assert zero3["losses"] == pytest.approx(zero0["losses"], rel=1e-4)
    assert report["checks"]["weight sync broadcast"]["bytes_per_sync"] > 0
    assert report["checks"]["hf engine"]["same_seeds_same_samples"] is True  # on CPU it must repeat
    assert "7 of 7 checks passed" in result.stdout
