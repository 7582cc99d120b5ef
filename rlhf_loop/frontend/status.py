"""`rlhf-loop status`: where a run stands, read from its manifest, heartbeat and metrics (no actor is started);
`--watch` redraws it until the run finishes."""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rlhf_loop.config import RunConfig, load_config
from rlhf_loop.rundir.heartbeat import HEARTBEAT_INTERVAL_S, read_heartbeat
from rlhf_loop.rundir.manifest import ITERATION_STAGES, Manifest, RunDir

# A live run's heartbeat is rewritten every HEARTBEAT_INTERVAL_S; ten missed beats mean its process is gone.
STALE_AFTER_S = 10 * HEARTBEAT_INTERVAL_S


def iteration_stages(cfg: RunConfig) -> tuple[str, ...]:
    """The stages an iteration of this run goes through, in order: offline DPO (pairs.dataset) samples, scores and
    evaluates nothing; train.enabled false trains and exports nothing; pairs_dataset only when exported; eval only
    with held-out prompts (eval.prompts)."""
    present = {"pairs", "done"}
    present |= {"rollouts", "scores"} if cfg.online else set()
    present |= {"pairs_dataset"} if cfg.pairs.export_format != "none" else set()
    present |= {"train", "export"} if cfg.train.enabled else set()
    present |= {"sync"} if cfg.online and cfg.train.enabled else set()
    present |= {"eval"} if cfg.evaluates else set()
    return tuple(stage for stage in ITERATION_STAGES if stage in present)


def run_status(root: str) -> dict[str, Any]:
    run_dir = RunDir.existing(root)
    cfg = load_config(run_dir.config_path)
    units = Manifest.load(run_dir).units
    # Every stage of the run in order: the warm start, pi_0's evaluation, then each iteration's stages.
    ordered: list[tuple[int | None, str, dict[str, Any]]] = []
    if cfg.sft.enabled:
        ordered.append((None, "sft", {"done": "sft/done" in units, "steps_done": _steps_done(units, "sft/step_")}))
    if cfg.evaluates:
        ordered.append((None, "eval_initial", {"done": "eval_initial" in units}))
    for iteration in range(1, cfg.iterations + 1):
        prefix = f"iter_{iteration:03d}/"
        ordered += [(iteration, stage, _stage_progress(units, prefix, stage)) for stage in iteration_stages(cfg)]
    later_done = False  # a stage whose successor finished is finished, whatever its own units say
    for _, _, progress in reversed(ordered):
        progress["done"] = later_done = progress["done"] or later_done
    current = next(((iteration, stage) for iteration, stage, progress in ordered if not progress["done"]), None)
    status: dict[str, Any] = {
        "run_dir": str(run_dir.root),
        "iterations": cfg.iterations,
        "iterations_done": sum(1 for iteration, stage, p in ordered if stage == "done" and p["done"]),
        "finished": current is None,
        "sft_done": ordered[0][2]["done"] if cfg.sft.enabled else None,
    }
    if current is not None:
        iteration, stage = current
        status["current"] = {
            "iteration": iteration,
            "stage": stage,
            "progress": {s: p for i, s, p in ordered if i == iteration},
        }
    status["heartbeat"], status["stopped_unannounced"] = _heartbeat(run_dir, finished=current is None)
    lines = run_dir.metrics_path.read_text().splitlines() if run_dir.metrics_path.exists() else []
    finished_metrics = [json.loads(line) for line in lines]
    status["last_metrics"] = finished_metrics[-1] if finished_metrics else None
    times = [m["time/iteration_s"] for m in finished_metrics if "time/iteration_s" in m]
    status["iteration_mean_s"] = statistics.fmean(times) if times else None
    status["eta_s"] = _eta_s(status, units)
    return status


def _eta_s(status: dict[str, Any], units: dict[str, dict]) -> float | None:
    """Seconds left: the finished iterations' mean time for each iteration not finished, less what the current one
    has spent; None before an iteration has finished, and once the run has."""
    if status["finished"] or status["iteration_mean_s"] is None:
        return None
    current = status["current"]["iteration"]
    spent = sum(info.get("seconds", 0.0) for unit, info in units.items()
                if current is not None and unit.startswith(f"iter_{current:03d}/"))
    left = status["iteration_mean_s"] * (status["iterations"] - status["iterations_done"])
    return max(left - spent, 0.0)


def _stage_progress(units: dict[str, dict], prefix: str, stage: str) -> dict[str, Any]:
    if stage in ("rollouts", "scores"):
        parts = [info for unit, info in units.items() if unit.startswith(f"{prefix}{stage}/")]
        total = parts[0]["of_shards"] if parts else None
        return {"done": total is not None and len(parts) == total, "shards_done": len(parts), "shards": total}
    if stage == "train":  # no unit of its own: done once the export after it is (see run_status)
        return {"done": False, "steps_done": _steps_done(units, f"{prefix}train/step_")}
    return {"done": prefix + stage in units}


def _steps_done(units: dict[str, dict], chunk_prefix: str) -> int:
    """Training runs in chunks, each a unit named by the step it reached ("iter_002/train/step_000040")."""
    steps = [int(match[1]) for unit in units if (match := re.fullmatch(re.escape(chunk_prefix) + r"(\d+)", unit))]
    return max(steps, default=0)


def _heartbeat(run_dir: RunDir, finished: bool) -> tuple[dict[str, Any] | None, str | None]:
    """The heartbeat with its age, and why the run looks stopped without having said so (None when it does not)."""
    beat = read_heartbeat(run_dir)
    if beat is None:
        return None, None
    now = time.time()
    shown = {"age_s": round(now - beat["time"], 1), "stage_s": round(now - beat["stage_since"], 1),
             **{key: beat[key] for key in ("pid", "host", "stage", "ended")}}
    if finished or beat["ended"] is not None:
        return shown, None
    if beat["host"] == socket.gethostname() and not _process_exists(beat["pid"]):
        return shown, f"its process {beat['pid']} on {beat['host']} is gone"
    if shown["age_s"] > STALE_AFTER_S:
        return shown, f"no heartbeat for {shown['age_s']:.0f} s"
    return shown, None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


def describe(status: dict[str, Any]) -> str:
    lines = [f"run {status['run_dir']}: {status['iterations_done']}/{status['iterations']} iterations done"]
    beat = status["heartbeat"]
    if beat:
        lines.append(f"  heartbeat {beat['age_s']:.0f} s ago: pid {beat['pid']} on {beat['host']}, stage "
                     f"'{beat['stage']}' for {beat['stage_s']:.0f} s" +
                     (f"; the process ended: {beat['ended']}" if beat["ended"] else ""))
    if status["stopped_unannounced"]:
        lines.append(f"  STOPPED without saying so ({status['stopped_unannounced']}); "
                     f"`rlhf-loop resume {status['run_dir']}` continues it")
    current = status.get("current")
    if current:
        where = f"iteration {current['iteration']}" if current["iteration"] else "before the first iteration"
        lines.append(f"  {where}: at stage '{current['stage']}'")
        for stage, progress in current["progress"].items():
            detail = "done" if progress["done"] else ", ".join(
                f"{k.replace('_', ' ')} {v}" for k, v in progress.items() if k != "done" and v is not None) or "-"
            lines.append(f"    {stage:<13} {detail}")
    if status.get("eta_s") is not None:
        lines.append(f"  about {_duration(status['eta_s'])} left ({_duration(status['iteration_mean_s'])} an "
                     f"iteration so far)")
    if status["last_metrics"]:
        m = status["last_metrics"]
        shown = ("reward/mean", "pairs/count", "dpo/loss", "dpo/reward_accuracy", "kl/ref", "eval/gold_mean",
                 "time/iteration_s")
        lines.append(f"  last metrics (iteration {m['iteration']}): " +
                     ", ".join(f"{k}={m[k]:.4g}" for k in shown if k in m))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


CLEAR = "\x1b[H\x1b[J"  # cursor home, clear to the end of the screen


def watch(root: str, interval_s: float, out: TextIO | None = None, frames: int | None = None,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Redraw the status every `interval_s` until the run finishes or Ctrl-C; in place on a terminal, one frame
    after another elsewhere. `frames` stops after that many (for tests)."""
    out = out or sys.stdout
    in_place = out.isatty()
    shown = 0
    try:
        while True:
            status = run_status(root)
            footer = "finished" if status["finished"] else f"every {interval_s:g} s; Ctrl-C stops watching"
            frame = f"{describe(status)}\n  [{time.strftime('%H:%M:%S')}, {footer}]\n"
            out.write(CLEAR + frame if in_place else ("\n" if shown else "") + frame)
            out.flush()
            shown += 1
            if status["finished"] or (frames is not None and shown >= frames):
                return
            sleep(interval_s)
    except KeyboardInterrupt:
        out.write("\n")  # the shell's prompt on a line of its own; the run itself goes on
