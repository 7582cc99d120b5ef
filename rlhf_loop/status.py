"""`rlhf-loop status`: where a run stands, read from its manifest and metrics (no actor is started)."""

from __future__ import annotations

import json
from typing import Any

from rlhf_loop.config import load_config
from rlhf_loop.rundir import Manifest, RunDir

# The order of the units of an iteration; the first one missing is where a resume picks up.
STAGES = ("rollouts", "scores", "pairs", "train", "export", "sync", "eval", "done")


def run_status(root: str) -> dict[str, Any]:
    run_dir = RunDir.existing(root)
    cfg = load_config(run_dir.config_path)
    units = Manifest.load(run_dir).units
    finished = [i for i in range(1, cfg.iterations + 1) if f"iter_{i:03d}/done" in units]
    current = next((i for i in range(1, cfg.iterations + 1) if i not in finished), None)
    status: dict[str, Any] = {
        "run_dir": str(run_dir.root),
        "iterations": cfg.iterations,
        "iterations_done": len(finished),
        "finished": current is None,
        "sft_done": "sft/done" in units if cfg.sft.enabled else None,
    }
    if current is not None:
        prefix = f"iter_{current:03d}/"
        progress = {stage: _stage_progress(units, prefix + stage) for stage in STAGES}
        status["current"] = {
            "iteration": current,
            "stage": next((stage for stage in STAGES if not progress[stage]["done"]), "done"),
            "progress": progress,
        }
    lines = run_dir.metrics_path.read_text().splitlines() if run_dir.metrics_path.exists() else []
    status["last_metrics"] = json.loads(lines[-1]) if lines else None
    return status


def _stage_progress(units: dict[str, dict], stage_unit: str) -> dict[str, Any]:
    if stage_unit in units:
        return {"done": True}
    parts = [info for unit, info in units.items() if unit.startswith(stage_unit + "/")]
    if stage_unit.endswith(("/rollouts", "/scores")):
        total = parts[0]["of_shards"] if parts else None
        return {"done": total is not None and len(parts) == total, "shards_done": len(parts), "shards": total}
    if stage_unit.endswith("/train"):
        return {"done": False, "steps_done": sum(p["steps"] for p in parts)}
    return {"done": False}


def describe(status: dict[str, Any]) -> str:
    lines = [f"run {status['run_dir']}: {status['iterations_done']}/{status['iterations']} iterations done"]
    if status["sft_done"] is False:
        lines.append("  sft warm start: not finished")
    current = status.get("current")
    if current:
        lines.append(f"  iteration {current['iteration']}: at stage '{current['stage']}'")
        for stage, progress in current["progress"].items():
            detail = "done" if progress["done"] else ", ".join(
                f"{k.replace('_', ' ')} {v}" for k, v in progress.items() if k != "done" and v is not None) or "-"
            lines.append(f"    {stage:<9} {detail}")
    if status["last_metrics"]:
        m = status["last_metrics"]
        shown = ("reward/mean", "pairs/count", "dpo/loss", "dpo/reward_accuracy", "kl/ref", "eval/gold_mean",
                 "time/iteration_s")
        lines.append(f"  last metrics (iteration {m['iteration']}): " +
                     ", ".join(f"{k}={m[k]:.4g}" for k in shown if k in m))
    return "\n".join(lines)
