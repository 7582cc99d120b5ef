"""Per-iteration metrics: RUN_DIR/iter_NNN/metrics.json, RUN_DIR/metrics.jsonl, a console line, and wandb when
enabled (with per-step training curves)."""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections.abc import Sequence

from rlhf_loop.common.console import say
from rlhf_loop.driver.data import PromptSet
from rlhf_loop.driver.pairs import PairSelection
from rlhf_loop.common.records import EPISODE_ENDS, Episode, Pair, Scored
from rlhf_loop.rundir.manifest import Manifest, RunDir, unit_order
from rlhf_loop.common.files import atomic_write_jsonl
from rlhf_loop.common.sequences import count_cuts


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
    return metrics | episode_metrics([r.episode for r in responses if r.episode is not None], "episodes")


def episode_metrics(episodes: Sequence[Episode], prefix: str) -> dict[str, float]:
    """Of multi-turn responses (none: no metrics): assistant turns per episode, the policy's own tokens, how the
    episodes ended (fractions per EPISODE_ENDS reason), and the environment's outcomes (their mean and how many
    episodes got one)."""
    if not episodes:
        return {}
    outcomes = [episode.outcome for episode in episodes if episode.outcome is not None]
    metrics = {
        f"{prefix}/turns_mean": statistics.fmean(episode.turns for episode in episodes),
        f"{prefix}/policy_tokens_mean": statistics.fmean(sum(episode.loss_mask) for episode in episodes),
        f"{prefix}/outcome_given_fraction": len(outcomes) / len(episodes),
        **{f"{prefix}/end_{end}_fraction": sum(episode.end == end for episode in episodes) / len(episodes)
           for end in EPISODE_ENDS},
    }
    if outcomes:
        metrics[f"{prefix}/outcome_mean"] = statistics.fmean(outcomes)
    return metrics


def prompt_metrics(prompt_set: PromptSet) -> dict[str, float]:
    return {"prompts/count": len(prompt_set.prompts), "prompts/skipped_too_long": prompt_set.skipped_too_long}


def pair_metrics(selection: PairSelection, train=None) -> dict[str, float]:
    """`train` (TrainConfig, when a learner trains on the pairs): how many pairs its lengths cut, counted by the
    rules the learner cuts by (rlhf_loop.common.sequences)."""
    metrics = {
        "pairs/count": len(selection.pairs),
        "pairs/dropped": sum(selection.dropped.values()),
        "pairs/flat_prompts": selection.flat_prompts,
        **{f"pairs/dropped_{reason}": count for reason, count in selection.dropped.items()},
    }
    if train is not None:
        cuts = count_cuts([(p.prompt_token_ids, p.chosen.token_ids, p.rejected.token_ids) for p in selection.pairs],
                          train.max_prompt_length, train.max_length)
        metrics |= {"pairs/truncated_prompt": cuts.prompts, "pairs/truncated_response": cuts.responses}
    return metrics


class Tracker:
    """Writes metrics.jsonl from the finished iterations' metrics, says one line per iteration on the console, and
    mirrors each iteration to wandb, with the training curves of its steps."""

    def __init__(self, run_dir: RunDir, wandb_cfg, config_dict: dict):
        self.run_dir = run_dir
        self.iterations = config_dict.get("iterations")
        self.wandb_run = None
        self._iteration_keys: set[str] = set()  # the iteration metrics given the iteration axis so far
        if wandb_cfg.mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                mode=wandb_cfg.mode,
                project=wandb_cfg.resolved_project,
                entity=wandb_cfg.resolved_entity,
                name=wandb_cfg.name or run_dir.root.name,
                tags=list(wandb_cfg.tags),
                dir=str(run_dir.root),
                config=config_dict,
                id=wandb_run_id(run_dir),
                resume="allow",  # a resumed run keeps logging to the same wandb run
            )

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        paths = sorted(self.run_dir.root.glob("iter_*/metrics.json"), key=lambda path: unit_order(path.parent.name))
        lines = [json.loads(path.read_text()) for path in paths]
        atomic_write_jsonl(self.run_dir.metrics_path, lines)
        previous = next((line for line in lines if line.get("iteration") == iteration - 1), None)
        say(summary_line(metrics, self.iterations, previous))
        if self.wandb_run is not None:
            self._define_axes(metrics)
            for row in step_curves(Manifest.load(self.run_dir).units, iteration):
                self.wandb_run.log(row)
            self.wandb_run.log({**metrics, "iteration": iteration})

    def _define_axes(self, metrics: dict[str, float]) -> None:
        """Two x axes: the training curves over the run's optimizer steps, everything else over iterations."""
        if not self._iteration_keys:
            self.wandb_run.define_metric(STEP_AXIS)
            self.wandb_run.define_metric("train/*", step_metric=STEP_AXIS)
            self.wandb_run.define_metric("iteration")
        for key in sorted(metrics.keys() - self._iteration_keys - {"iteration"}):
            self.wandb_run.define_metric(key, step_metric="iteration")
        self._iteration_keys |= metrics.keys() | {"iteration"}

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def summary_line(metrics: dict[str, float], iterations: int | None, previous: dict[str, float] | None) -> str:
    """`iter 2/3  reward 0.29 (+1.25)  gold 0.67  kl 0.95  pairs 498/512  42.1 s`: the mean reward of the
    iteration's samples (its change from the previous iteration's), the evaluated policy's gold mean and KL to the
    reference (with episodes, their mean turns and outcome), the pairs kept of the prompts sampled, and the
    iteration's time; what a run does not measure is left out (offline DPO shows its DPO loss instead of rewards)."""
    parts = [f"iter {metrics['iteration']}/{iterations or '?'}"]
    if "reward/mean" in metrics:
        change = (f" ({metrics['reward/mean'] - previous['reward/mean']:+.3g})"
                  if previous and "reward/mean" in previous else "")
        parts.append(f"reward {metrics['reward/mean']:.3g}{change}")
    elif "dpo/loss" in metrics:
        parts.append(f"loss {metrics['dpo/loss']:.3g}")
    parts += [f"{name} {metrics[key]:.3g}" for name, key in (("gold", "eval/gold_mean"), ("kl", "kl/ref"),
                                                              ("turns", "episodes/turns_mean"),
                                                              ("outcome", "episodes/outcome_mean"))
              if key in metrics]
    if "pairs/count" in metrics:
        of = f"/{metrics['prompts/count']}" if "prompts/count" in metrics else ""
        parts.append(f"pairs {metrics['pairs/count']}{of}")
    if "time/iteration_s" in metrics:
        parts.append(f"{metrics['time/iteration_s']:.1f} s")
    return "  ".join(parts)


STEP_AXIS = "train/step"  # optimizer steps since the run began, over every iteration
STEP_CURVES = ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward", "learning_rate")


def step_curves(units: dict[str, dict], iteration: int) -> list[dict[str, float]]:
    """The training chunks of `iteration` (units "iter_NNN/train/step_NNNNNN", each with its steps' means) as
    rows on the run's step axis: an iteration's steps count on from where the iterations before it ended."""
    chunks: dict[int, list[tuple[int, dict]]] = {}
    for unit, info in units.items():
        if match := re.fullmatch(r"iter_(\d+)/train/step_(\d+)", unit):
            chunks.setdefault(int(match[1]), []).append((int(match[2]), info))
    start = sum(max(step for step, _ in done) for earlier, done in chunks.items() if earlier < iteration)
    return [{STEP_AXIS: start + step, **{f"train/{key}": info[key] for key in STEP_CURVES if key in info}}
            for step, info in sorted(chunks.get(iteration, []), key=lambda chunk: chunk[0])]


def wandb_run_id(run_dir: RunDir) -> str:
    """One wandb run per run: the run id made with the run directory, kept by `resume` and new after --overwrite.
    Runs started before run ids existed keep the id derived from their path, so they go on logging where they did."""
    return Manifest.load(run_dir).run_id or hashlib.sha256(str(run_dir.root.resolve()).encode()).hexdigest()[:16]
