"""The stages of one iteration. Each is resumable: it skips the units that the manifest marks finished and
re-reads their outputs, so a crash costs at most the unit in flight (a shard, `save_steps` training steps, ...)."""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tqdm.auto import tqdm

from policy.config import PolicyConfig
from policy.learner_protocol import Learner, TrainStats
from policy.rollout_protocol import Sampling
from reward.base import RewardModel, RewardQuery
from reward.shaping import length_penalized
from rlhf_loop.common import console
from rlhf_loop.common import records
from rlhf_loop.config import RunConfig
from rlhf_loop.common.errors import UserError
from rlhf_loop.rundir.heartbeat import write_heartbeat
from rlhf_loop.driver.metrics import episode_metrics
from rlhf_loop.driver.pairs import PairSelection, select_pairs
from rlhf_loop.common.records import Pair, Prompt, Rollout, Scored
from rlhf_loop.rundir.manifest import Manifest, RunDir, unit_order
from rlhf_loop.common.files import atomic_write_json, atomic_write_jsonl, read_jsonl
from rlhf_loop.common.seeds import derived_seed

if TYPE_CHECKING:  # both import Ray; the loop builds them
    from policy.learner_group import SFTActor
    from policy.rollout_group import RolloutGroup

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class Run:
    """What every stage needs: the config, where outputs go, and what is already finished."""

    cfg: RunConfig
    run_dir: RunDir
    manifest: Manifest

    def unit(self, iteration: int, name: str) -> str:
        return f"iter_{iteration:03d}/{name}"

    def enter(self, unit: str) -> None:
        """Say in the heartbeat which unit of work the run is in (`rlhf-loop status` shows it)."""
        write_heartbeat(self.run_dir, unit)

    def seconds(self, iteration: int, stage: str = "") -> float:
        """Time spent in an iteration (or one of its stages) over all processes of the run, resumed ones included."""
        prefix = self.unit(iteration, stage)
        return sum(info.get("seconds", 0.0) for unit, info in self.manifest.units.items()
                   if unit == prefix or unit.startswith(prefix.rstrip("/") + "/"))


# ---- sharded stages: generation and scoring ---------------------------------------------------------------------

def run_sharded(
    run: Run,
    iteration: int,
    stage: str,
    items: Sequence[Item],
    shard_size: int,
    work: Callable[[Sequence[Item]], list[Result]],
    encode: Callable[[Result], dict],
    decode: Callable[[dict], Result],
    on_shard: Callable[[list[Result]], None] | None = None,
    first_index: int = 0,
    of_shards: int | None = None,
    **info,
) -> list[Result]:
    """Apply `work` shard by shard; a finished shard is read back from disk, never redone. `on_shard` sees the
    results so far after each shard; `info` goes into each shard's manifest entry. A stage taken in blocks
    (train.sync_every_steps) numbers each block's shards from `first_index`, of `of_shards` in the stage."""
    shards = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    results: list[Result] = []
    for index, shard in enumerate(tqdm(shards, desc=f"iter {iteration} {stage}", unit="shard", leave=False,
                                       file=console.stream()), start=first_index):
        results += run_shard(run, iteration, stage, index, of_shards or len(shards), shard, work, encode, decode,
                             **info)
        if on_shard is not None:
            on_shard(results)
    return results


def run_shard(run: Run, iteration: int, stage: str, index: int, of_shards: int, shard: Sequence[Item],
              work: Callable[[Sequence[Item]], list[Result]], encode: Callable[[Result], dict],
              decode: Callable[[dict], Result], **info) -> list[Result]:
    """One shard of a sharded stage: read back when finished, else worked, written and recorded (with `info`)."""
    unit = run.unit(iteration, f"{stage}/shard_{index:05d}")
    if run.manifest.done_and_intact(unit):  # a damaged shard file is dropped here, and redone
        return [decode(row) for row in read_jsonl(run.manifest.verified_file(unit))]
    run.enter(unit)
    start = time.perf_counter()
    shard_results = work(shard)
    path = run.run_dir.iteration(iteration) / stage / f"shard_{index:05d}.jsonl"
    atomic_write_jsonl(path, map(encode, shard_results))
    run.manifest.record(unit, files=[path], items=len(shard), of_shards=of_shards,
                        seconds=time.perf_counter() - start, **info)
    return shard_results


def sampling_of(run: Run, iteration: int) -> Sampling:
    """How an iteration samples: rollout.* and a seed of its own."""
    cfg = run.cfg.rollout
    return Sampling(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                    max_tokens=cfg.max_tokens, seed=derived_seed(run.cfg.seed, "rollout", iteration))


def score_shard(run: Run, reward: RewardModel, rollouts: Sequence[Rollout], iteration: int, index: int,
                of_shards: int) -> list[Scored]:
    """One scoring shard (reward.shard_size rollouts) of an iteration."""
    penalty = run.cfg.reward.length_penalty
    return run_shard(run, iteration, "scores", index, of_shards, rollouts,
                     lambda shard: score_rollouts(reward, shard, penalty), records.to_json, records.scored_from_json)


def score_rollouts(reward: RewardModel, rollouts: Sequence[Rollout], length_penalty: float) -> list[Scored]:
    """The reward model's scores, less reward.length_penalty per sampled token (the raw ones kept beside)."""
    queries = [RewardQuery(r.prompt.messages, [resp.text for resp in r.responses], r.prompt.meta,
                           [resp.episode for resp in r.responses if resp.episode is not None]) for r in rollouts]
    results = reward.score(queries)
    return [
        Scored(r, length_penalized(res.scores, [resp.sampled_tokens for resp in r.responses], length_penalty),
               res.objectives, list(res.scores))
        for r, res in zip(rollouts, results, strict=True)
    ]


# ---- pairs ----------------------------------------------------------------------------------------------------------

def build_pairs(run: Run, scored: Sequence[Scored], iteration: int) -> PairSelection:
    """Best vs worst (or the configured strategy) among each prompt's scored responses."""
    unit = run.unit(iteration, "pairs")
    if run.manifest.done_and_intact(unit):
        return _recorded_pairs(run, unit)
    return _record_pairs(run, unit, iteration, pick_pairs(run, scored, iteration))


def pick_pairs(run: Run, scored: Sequence[Scored], iteration: int) -> PairSelection:
    """pairs.* applied to scored prompts of an iteration. Each prompt's pairs depend only on that prompt, so picking
    shard by shard and concatenating gives the pairs picked from all the prompts at once, in the same order."""
    cfg = run.cfg.pairs
    return select_pairs(scored, cfg.strategy, cfg.min_margin, derived_seed(run.cfg.seed, "pairs", iteration),
                        cfg.per_prompt, cfg.multi)


def dataset_pairs(run: Run, tokenizer, iteration: int) -> PairSelection:
    """Offline DPO: the pairs of a given preference dataset, rendered with the policy's chat template."""
    from rlhf_loop.driver.data import load_preference_pairs

    unit = run.unit(iteration, "pairs")
    if run.manifest.done_and_intact(unit):
        return _recorded_pairs(run, unit)
    cfg = run.cfg
    loaded = load_preference_pairs(cfg.pairs.dataset, cfg.pairs.dataset_split, tokenizer, cfg.data.max_prompt_tokens)
    dropped = {"prompt_too_long": loaded.skipped_too_long} if loaded.skipped_too_long else {}
    return _record_pairs(run, unit, iteration, PairSelection(loaded.pairs, dropped))


def _record_pairs(run: Run, unit: str, iteration: int, selection: PairSelection) -> PairSelection:
    path = run.run_dir.iteration(iteration) / "pairs.jsonl"
    atomic_write_jsonl(path, map(records.to_json, selection.pairs))
    run.manifest.record(unit, files=[path], count=len(selection.pairs), dropped=selection.dropped,
                        flat_prompts=selection.flat_prompts)
    return selection


def _recorded_pairs(run: Run, unit: str) -> PairSelection:
    rows, info = read_jsonl(run.manifest.verified_file(unit)), run.manifest.info(unit)
    return PairSelection([records.pair_from_json(row) for row in rows], info["dropped"], info.get("flat_prompts", 0))


def export_pairs(run: Run, pairs: Sequence[Pair], iteration: int) -> None:
    """The iteration's pairs as a DPO dataset (prompt/chosen/rejected conversations), when pairs.export_format asks."""
    cfg = run.cfg.pairs
    unit = run.unit(iteration, "pairs_dataset")
    if cfg.export_format == "none" or run.manifest.done(unit):
        return
    from rlhf_loop.driver.export import write_preference_dataset

    start = time.perf_counter()
    out = write_preference_dataset(list(pairs), run.run_dir.iteration(iteration) / "pairs_dataset", cfg.export_format,
                                   cfg.export_test_fraction, derived_seed(run.cfg.seed, "export", iteration),
                                   cfg.push_to_hub, cfg.push_to_hub_private)
    run.manifest.record(unit, path=str(out.relative_to(run.run_dir.root)), seconds=time.perf_counter() - start)


# ---- training ---------------------------------------------------------------------------------------------------------

NOT_AVERAGED = ("step", "total_steps")


def train(run: Run, learner: Learner, pairs: Sequence[Pair], iteration: int, reference_dir: str | None
          ) -> dict[str, float]:
    """DPO on the iteration's pairs, checkpointing every `train.save_steps` steps; returns step-weighted means."""
    if not pairs:
        console.say(f"rlhf-loop: iteration {iteration}: no pairs (every prompt's responses tied or were identical); "
                    "no DPO step")
        return {field.name: math.nan for field in dataclasses.fields(TrainStats) if field.name not in NOT_AVERAGED}
    began = time.perf_counter()
    total_steps = learner.begin_iteration(iteration, list(pairs), reference_dir)
    unit_prefix = run.unit(iteration, "train/step_")
    train_in_chunks(run, learner, total_steps, run.cfg.train.save_steps, "train/step_", unit_prefix,
                    run.run_dir.iteration(iteration) / "learner", f"iter {iteration} train",
                    setup_s=time.perf_counter() - began)
    return chunk_means(run, unit_prefix)


def engines_asleep(rollout: RolloutGroup | None, learner: Learner) -> AbstractContextManager:
    """Engines colocated with the learner (cluster.colocate) free their GPUs for the block, while the learner's
    training state is on them (policy.colocation); others stay as they are."""
    return rollout.asleep(learner) if rollout is not None else nullcontext()


def sft_warm_start(run: Run, device: str) -> PolicyConfig:
    """Supervised warm start of pi_0 on `sft.dataset`; returns the policy config every role then starts from."""
    from policy.learner_group import SFTActor
    from rlhf_loop.driver.data import load_sft_conversations

    directory = run.run_dir.root / "sft" / "policy"
    initial = replace(run.cfg.policy, model_path=str(directory), tokenizer_path=None)
    if run.manifest.done_and_intact("sft/done"):
        return initial
    cfg = run.cfg.sft
    conversations = load_sft_conversations(cfg)
    learner = SFTActor(run.cfg.policy, cfg, device, run.cfg.seed, run.cfg.cluster.placement.learner.resource)
    try:
        checkpoint = run.manifest.intact_checkpoint("sft/step_")
        if checkpoint is not None:
            learner.load_checkpoint(str(checkpoint))
        began = time.perf_counter()
        total_steps = learner.begin(conversations)
        train_in_chunks(run, learner, total_steps, cfg.save_steps, "sft/step_", "sft/step_",
                        run.run_dir.root / "sft" / "learner", "sft", setup_s=time.perf_counter() - began)
        learner.export_hf(str(directory))
    finally:
        learner.shutdown()
    run.manifest.record("sft/done", tree=directory, path=str(directory.relative_to(run.run_dir.root)),
                        **chunk_means(run, "sft/step_"))
    shutil.rmtree(run.run_dir.root / "sft" / "learner", ignore_errors=True)  # the export is all that is needed now
    return initial


def train_in_chunks(run: Run, learner: Learner | SFTActor, total_steps: int, save_steps: int, kind: str,
                    unit_prefix: str, checkpoints: Path, description: str, setup_s: float = 0.0) -> None:
    """Train `save_steps` steps at a time; each chunk ends in a checkpoint that becomes a finished unit, with the
    size and checksum of its every file. The newest two checkpoints of a kind are kept: resume falls back to the
    older one when the newest is damaged. `setup_s`, the learner's set-up for these steps (reference log-probs,
    tokenisation), counts into the first chunk's seconds, so that time/train_s holds all of training."""
    kept = [run.run_dir.root / run.manifest.info(unit)["checkpoint"]
            for unit in sorted((unit for unit in run.manifest.units if kind in unit), key=unit_order)][-2:]
    step = steps_recorded(run, unit_prefix)
    with tqdm(total=total_steps, initial=step, desc=description, unit="step", leave=False,
              file=console.stream()) as bar:
        while step < total_steps:
            run.enter(unit_prefix.rstrip("_"))
            start, setup_s = time.perf_counter() - setup_s, 0.0
            stats = learner.train_steps(min(save_steps, total_steps - step))
            checkpoint = checkpoints / f"step_{stats.step:06d}"
            learner.save_checkpoint(str(checkpoint))
            run.manifest.record(
                f"{unit_prefix}{stats.step:06d}",
                tree=checkpoint,
                checkpoint=str(checkpoint.relative_to(run.run_dir.root)),
                steps=stats.step - step,
                seconds=time.perf_counter() - start,
                **{k: v for k, v in dataclasses.asdict(stats).items() if k not in NOT_AVERAGED},
            )
            kept.append(checkpoint)
            while len(kept) > 2:
                remove_checkpoint(kept.pop(0), checkpoints)
            bar.update(stats.step - step)
            step = stats.step


def steps_recorded(run: Run, unit_prefix: str) -> int:
    """The step that the newest recorded training chunk reached (each unit is named by it: "iter_002/train/step_000040");
    0 before any."""
    return max((int(unit.rsplit("_", 1)[1]) for unit in run.manifest.units if unit.startswith(unit_prefix)), default=0)


def remove_checkpoint(directory: Path, checkpoints: Path) -> None:
    """Delete a checkpoint, and its iteration's learner/ directory once that is empty."""
    shutil.rmtree(directory, ignore_errors=True)
    if directory.parent != checkpoints and directory.parent.is_dir() and not any(directory.parent.iterdir()):
        directory.parent.rmdir()


def chunk_means(run: Run, unit_prefix: str) -> dict[str, float]:
    """Step-weighted means of the statistics recorded with each training chunk."""
    chunks = [info for unit, info in run.manifest.units.items() if unit.startswith(unit_prefix)]
    steps = sum(chunk["steps"] for chunk in chunks)
    if steps == 0:
        return {}
    keys = [k for k, v in chunks[0].items() if isinstance(v, float) and k != "seconds"]
    return {key: sum(chunk[key] * chunk["steps"] for chunk in chunks) / steps for key in keys}


# ---- export, sync ------------------------------------------------------------------------------------------------

def export_policy(run: Run, learner: Learner, iteration: int) -> Path:
    """The iteration's policy in HF format: what users keep, and the reference for `reference: previous`; with
    train.lora, the merged policy and, beside it in adapter/, the adapter alone."""
    unit = run.unit(iteration, "export")
    directory = run.run_dir.iteration(iteration) / "policy"
    if run.manifest.done(unit):
        problem = run.manifest.verify_unit(unit)
        if problem is None:
            return directory
        final = final_checkpoint(run, iteration)
        if final is None:  # the learner has moved on since: the export cannot be made again from it
            raise UserError(f"{problem}; the exported policy of iteration {iteration} cannot be rebuilt: its final "
                            f"checkpoint is gone, damaged or followed by later training: restore the file, or start "
                            f"the run again in a new --run-dir")
        run.manifest.drop([unit], f"{problem}; rebuilding it from {final.relative_to(run.run_dir.root)}")
        learner.load_checkpoint(str(final))
    run.enter(unit)
    start = time.perf_counter()
    learner.export_hf(str(directory))
    extra = {}
    if run.cfg.train.lora.enabled:
        adapter = run.run_dir.iteration(iteration) / "adapter"
        learner.export_adapter(str(adapter))
        extra["adapter"] = str(adapter.relative_to(run.run_dir.root))
    run.manifest.record(unit, tree=directory, path=str(directory.relative_to(run.run_dir.root)),
                        seconds=time.perf_counter() - start, **extra)
    return directory


def final_checkpoint(run: Run, iteration: int) -> Path | None:
    """The checkpoint that ended `iteration`'s training, when it is intact and no training came after it: the
    learner state its exported policy was made from."""
    units = sorted((unit for unit in run.manifest.units if "train/step_" in unit), key=unit_order)
    if not units or not units[-1].startswith(run.unit(iteration, "train/step_")):
        return None
    if run.manifest.verify_unit(units[-1]) is not None:
        return None
    return run.run_dir.root / run.manifest.info(units[-1])["checkpoint"]


def sync_weights(learner: Learner, rollout: RolloutGroup) -> float:
    """Push the learner's weights to every rollout engine in memory, no disk (rollout.weight_sync: a broadcast in
    buckets from learner rank 0, or one copy through Ray's object store)."""
    start = time.perf_counter()
    rollout.sync_from(learner)
    return time.perf_counter() - start


# ---- evaluation ------------------------------------------------------------------------------------------------

EVAL_INITIAL = "eval_initial"


def evaluate(run: Run, rollout: RolloutGroup, reward: RewardModel, learner: Learner, prompts: Sequence[Prompt],
             iteration: int | None, gold: Callable | None) -> dict[str, float]:
    """Held-out evaluation of the current policy; iteration None evaluates pi_0, the baseline for win rates."""
    unit = EVAL_INITIAL if iteration is None else run.unit(iteration, "eval")
    if run.manifest.done_and_intact(unit):
        return run.manifest.info(unit)["metrics"]
    run.enter(unit)
    start = time.perf_counter()
    cfg = run.cfg.eval
    sampling = Sampling(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=run.cfg.rollout.top_p,
                        max_tokens=cfg.max_tokens,
                        seed=derived_seed(run.cfg.seed, "eval"))  # same seed each iteration: less noisy deltas
    # One row per sampled response, in (prompt, sample) order, so iteration t's row i faces pi_0's row i.
    scored = score_rollouts(reward, rollout.generate(prompts, sampling), run.cfg.reward.length_penalty)
    samples = [(item.rollout.prompt, response, score) for item in scored
               for response, score in zip(item.rollout.responses, item.scores, strict=True)]
    raw_scores = [raw for item in scored for raw in item.raw_scores]
    rows = [{"prompt_index": prompt.index, "response": r.text, "tokens": len(r.token_ids), "reward": s,
             "raw_reward": raw, **_episode_row(r)} for (prompt, r, s), raw in zip(samples, raw_scores, strict=True)]
    metrics = {"eval/reward_mean": statistics.fmean(s for _, _, s in samples),
               "eval/response_tokens_mean": statistics.fmean(len(r.token_ids) for _, r, _ in samples)}
    if run.cfg.reward.length_penalty:
        metrics["eval/reward_raw_mean"] = statistics.fmean(raw_scores)
    metrics |= episode_metrics([r.episode for _, r, _ in samples if r.episode is not None], "eval")
    if gold is not None:
        golds = [gold(prompt.messages, r.text, prompt.meta) for prompt, r, _ in samples]
        for row, value in zip(rows, golds, strict=True):
            row["gold"] = value
        metrics["eval/gold_mean"] = statistics.fmean(golds)
    if iteration is not None:
        metrics["kl/ref"], metrics["kl/ref_stderr"] = kl_to_reference(rollout, learner, prompts, sampling,
                                                                      [(prompt, r) for prompt, r, _ in samples])
        initial_tokens = run.manifest.info(EVAL_INITIAL)["metrics"]["eval/response_tokens_mean"]
        metrics["eval/length_drift"] = metrics["eval/response_tokens_mean"] / initial_tokens  # 1: pi_0's length
        initial = read_jsonl(run.manifest.verified_file(EVAL_INITIAL))
        wins = [1.0 if row["reward"] > base["reward"] else 0.5 if row["reward"] == base["reward"] else 0.0
                for row, base in zip(rows, initial, strict=True)]
        metrics["eval/win_rate_vs_initial"] = statistics.fmean(wins)
    path = (run.run_dir.root / "eval_initial.jsonl" if iteration is None
            else run.run_dir.iteration(iteration) / "eval.jsonl")
    atomic_write_jsonl(path, rows)
    run.manifest.record(unit, files=[path], metrics=metrics, seconds=time.perf_counter() - start)
    return metrics


def _episode_row(response: records.Response) -> dict:
    """An evaluated episode's turns, outcome and ending, beside its last turn (`response`) in eval.jsonl."""
    episode = response.episode
    return {} if episode is None else {"turns": episode.turns, "outcome": episode.outcome, "end": episode.end}


def kl_to_reference(rollout: RolloutGroup, learner: Learner, prompts: Sequence[Prompt], sampling: Sampling,
                    samples: Sequence[tuple[Prompt, records.Response]]) -> tuple[float, float]:
    """KL(pi || ref) and the standard error of its estimate: the mean over y ~ pi of log pi(y) - log ref(y), the
    log-ratio the learner computes from the policy's own distribution (temperature 1, every token). That mean is
    unbiased only when y is drawn from that same distribution: drawn at top_p < 1, y never holds the tokens outside
    the nucleus, so the mean is taken over another distribution (0.64 nats for a true 0.28 on the toy case in the
    tests), and no importance weighting can bring back tokens that are never drawn; a temperature other than 1 skews
    it too. So the evaluation samples serve only when they were drawn at temperature 1 and top_p 1; otherwise the KL
    gets its own samples, drawn that way (as many, with a seed of their own). The estimate is unbiased but heavy-tailed: a few samples that ref finds
    far less likely than pi carry much of it, and an episode sums the ratio over all its turns, so its standard error
    tells a moved policy from a noisy estimate."""
    if (sampling.temperature, sampling.top_p) != (1.0, 1.0):
        own = replace(sampling, temperature=1.0, top_p=1.0, seed=derived_seed(sampling.seed, "kl"))
        samples = [(item.prompt, response) for item in rollout.generate(prompts, own) for response in item.responses]
    prompts_ids, responses_ids = [prompt.token_ids for prompt, _ in samples], [r.token_ids for _, r in samples]
    if any(r.episode is not None for _, r in samples):  # episodes: the policy's own tokens only
        log_ratios = learner.log_ratios(prompts_ids, responses_ids, [r.loss_mask for _, r in samples])
    else:
        log_ratios = learner.log_ratios(prompts_ids, responses_ids)
    stderr = statistics.stdev(log_ratios) / math.sqrt(len(log_ratios)) if len(log_ratios) > 1 else math.nan
    return statistics.fmean(log_ratios), stderr


# ---- metrics ------------------------------------------------------------------------------------------------------

STAGE_TIMES = {"time/generate_s": "rollouts", "time/score_s": "scores", "time/train_s": "train",
               "time/sync_s": "sync", "time/eval_s": "eval"}


def finish_iteration(run: Run, iteration: int, metrics: dict[str, float]) -> dict[str, float]:
    """Write the iteration's metrics (stage times summed over every process that worked on it) and mark it done."""
    metrics = {"iteration": iteration, **metrics}
    metrics.update({key: run.seconds(iteration, stage) for key, stage in STAGE_TIMES.items()})
    metrics["time/iteration_s"] = run.seconds(iteration)
    path = run.run_dir.iteration(iteration) / "metrics.json"
    atomic_write_json(path, metrics)
    run.manifest.record(run.unit(iteration, "done"), files=[path])
    return metrics


# ---- set-up helpers --------------------------------------------------------------------------------------------------

def reference_policy(run: Run, initial_policy: PolicyConfig, iteration: int) -> str:
    """The DPO reference of an iteration: pi_0, or (reference: previous) the policy the iteration started from."""
    if run.cfg.train.reference == "previous" and iteration > 1:
        return str(run.run_dir.iteration(iteration - 1) / "policy")
    return initial_policy.model_path


def sync(run: Run, learner: Learner, rollout: RolloutGroup, iteration: int) -> None:
    unit = run.unit(iteration, "sync")
    if not run.manifest.done(unit):  # once done, the start-up sync of a resumed process has the same effect
        run.manifest.record(unit, seconds=sync_weights(learner, rollout))


def load_gold(eval_cfg) -> Callable | None:
    """The task's gold scorer (toy tasks with a known rule), named by "module:attr" or "file.py:attr"."""
    from rlhf_loop.common.user_code import load_code_reference

    return load_code_reference(eval_cfg.gold_reward, "eval.gold_reward") if eval_cfg.gold_reward else None
