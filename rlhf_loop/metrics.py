"""Per-iteration metrics: RUN_DIR/iter_NNN/metrics.json, RUN_DIR/metrics.jsonl, and wandb when enabled."""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Sequence

from rlhf_loop.data import PromptSet
from rlhf_loop.pairs import PairSelection
from rlhf_loop.records import Pair, Scored
from rlhf_loop.rundir import RunDir, atomic_write_jsonl


def reward_metrics(scored: Sequence[Scored], pairs: Sequence[Pair]) -> dict[str, float]:
    scores = [s for item in scored for s in item.scores]
    metrics = {
        "reward/mean": statistics.fmean(scores),
        "reward/std": statistics.pstdev(scores),
        "reward/chosen_mean": statistics.fmean(p.chosen_score for p in pairs) if pairs else float("nan"),
        "reward/rejected_mean": statistics.fmean(p.rejected_score for p in pairs) if pairs else float("nan"),
    }
    raw_scores = [s for item in scored for s in item.raw_scores or item.scores]
    if raw_scores != scores:  # reward.length_penalty is on
        metrics["reward/raw_mean"] = statistics.fmean(raw_scores)
    for objective in scored[0].objectives if scored else ():
        metrics[f"reward/{objective}_mean"] = statistics.fmean(v for item in scored for v in item.objectives[objective])
    responses = [r for item in scored for r in item.rollout.responses]
    metrics["rollout/response_tokens_mean"] = statistics.fmean(len(r.token_ids) for r in responses)
    metrics["rollout/truncated_fraction"] = sum(r.finish_reason == "length" for r in responses) / len(responses)
    return metrics


def prompt_metrics(prompt_set: PromptSet) -> dict[str, float]:
    return {"prompts/count": len(prompt_set.prompts), "prompts/skipped_too_long": prompt_set.skipped_too_long}


def pair_metrics(selection: PairSelection) -> dict[str, float]:
    return {
        "pairs/count": len(selection.pairs),
        "pairs/dropped": sum(selection.dropped.values()),
        "pairs/flat_prompts": selection.flat_prompts,
        **{f"pairs/dropped_{reason}": count for reason, count in selection.dropped.items()},
    }


class Tracker:
    """Writes metrics.jsonl from the finished iterations' metrics and mirrors each new line to wandb."""

    def __init__(self, run_dir: RunDir, wandb_cfg, config_dict: dict):
        self.run_dir = run_dir
        self.wandb_run = None
        if wandb_cfg.mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                mode=wandb_cfg.mode,
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=wandb_cfg.name or run_dir.root.name,
                tags=list(wandb_cfg.tags),
                dir=str(run_dir.root),
                config=config_dict,
                id=_wandb_id(run_dir),
                resume="allow",  # a resumed run keeps logging to the same wandb run
            )

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        lines = [json.loads(p.read_text()) for p in sorted(self.run_dir.root.glob("iter_*/metrics.json"))]
        atomic_write_jsonl(self.run_dir.metrics_path, lines)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=iteration)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_id(run_dir: RunDir) -> str:
    """One wandb run per run directory, so a resumed run keeps logging to the same one."""
    return hashlib.sha256(str(run_dir.root.resolve()).encode()).hexdigest()[:16]
