"""Taking an iteration's sample with its stages overlapped: each finished generation shard goes to the reward model
while the engines generate the next one (they are separate actors), and under `rollout.max_staleness: 1` the next
iteration's whole sample is taken in the background while the learner trains. A sample taken in time also hands
each scoring shard's pairs to the learner as soon as they are scored, so that it prepares the iteration (tokenises,
computes the reference's log-probabilities) while the engines still generate: begin_iteration then does only the rest.

    sampler = Sampler(run, rollout, reward, learner, tokenizer, learner_version(run), initial_policy)
    sample = sampler.sample(iteration)   # prompts, scored rollouts, pairs: taken ahead, or now
    sampler.start_ahead(iteration + 1)   # max_staleness 1: the next sample starts, from the weights the engines hold
    ...                                  # train
    sampler.sync(iteration)              # waits for that sample, then the new weights go to the engines

The units of work stay those of the manifest (a generation shard, a scoring shard, the pairs), each recorded by the
thread that finished it; a unit's result depends only on its inputs and seeds, never on what ran beside it, so
resume is exact as before. Every generation shard records its policy version, the iteration whose weights sampled
it (`RunConfig.policy_version`). Before a sample the engines are given that version: from the learner when it holds
it, else from the version's HF export (iter_NNN/policy); a resumed process needs the export when its learner is
already past the version the next sample is due from (killed while training i with i+1 half sampled).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_loop.common import records
from rlhf_loop.driver import stages
from rlhf_loop.common.arithmetic import ceil_div
from rlhf_loop.common.background import in_background
from rlhf_loop.driver.data import PromptSet, iteration_prompts
from rlhf_loop.driver.pairs import PairSelection
from rlhf_loop.common.records import Prompt, Rollout, Scored
from rlhf_loop.rundir.manifest import iteration_of, unit_order

if TYPE_CHECKING:  # they import Ray
    from policy.config import PolicyConfig
    from policy.learner_protocol import Learner
    from policy.rollout_group import RolloutGroup
    from reward.base import RewardModel


@dataclass(frozen=True)
class Block:
    """Semi-online (train.sync_every_steps): one block of an iteration's prompts, `start` to `end`, sampled from the
    weights after `policy_step` optimizer steps of the iteration. Its generation and scoring shards are numbered on
    from the blocks before it (`first_*_shard`), of the iteration's `*_shards` in all."""

    start: int
    end: int
    policy_step: int
    first_rollout_shard: int
    first_score_shard: int
    rollout_shards: int
    score_shards: int


@dataclass(frozen=True)
class IterationSample:
    """What an iteration sampled: its prompts, their scored responses and the pairs picked from them."""

    prompt_set: PromptSet
    scored: list[Scored]
    selection: PairSelection


def generate_and_score(run: stages.Run, rollout: RolloutGroup, reward: RewardModel, prompts: Sequence[Prompt],
                       iteration: int, on_scored: Callable[[list[Scored]], None] | None = None,
                       block: Block | None = None) -> list[Scored]:
    """Generation shard by shard; each scoring shard goes to the reward model as soon as the rollouts it covers are
    generated (or read back), so the reward model scores while the engines generate the next shard. `on_scored`
    sees each scoring shard's results as they come in, in order, in the scoring thread. `block`: the prompts are
    that block of the iteration's (semi-online)."""
    version = run.cfg.policy_version(iteration)
    step = block.policy_step if block is not None else 0
    sampling = stages.sampling_of(run, iteration)
    size = run.cfg.reward.shard_size
    of_shards = ceil_div(len(prompts), size)
    first_score, score_shards = (block.first_score_shard, block.score_shards) if block else (0, of_shards)
    placed = (dict(first_index=block.first_rollout_shard, of_shards=block.rollout_shards, policy_step=step)
              if block is not None else {})
    scoring: list[Future[list[Scored]]] = []

    def generate(shard: Sequence[Prompt]) -> list[Rollout]:
        return [replace(r, policy_version=version, policy_step=step) for r in rollout.generate(shard, sampling)]

    def score(rollouts: Sequence[Rollout], index: int) -> list[Scored]:
        scored = stages.score_shard(run, reward, rollouts, iteration, first_score + index, score_shards)
        if on_scored is not None:
            on_scored(scored)
        return scored

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="score") as scorer:
        def score_what_is_ready(generated: list[Rollout]) -> None:
            failed = next((future for future in scoring if future.done() and future.exception()), None)
            if failed is not None:  # a scoring error stops the run now, not once every shard is generated
                raise failed.exception()
            while len(scoring) < of_shards and min((len(scoring) + 1) * size, len(prompts)) <= len(generated):
                index = len(scoring)
                scoring.append(scorer.submit(score, generated[index * size:(index + 1) * size], index))
        try:
            stages.run_sharded(run, iteration, "rollouts", prompts, run.cfg.rollout.shard_size, generate,
                               records.to_json, records.rollout_from_json, score_what_is_ready, policy_version=version,
                               **placed)
        except BaseException:
            for future in scoring:
                future.cancel()  # the one being scored finishes; it is recorded, and kept for the resume
            raise
        return [scored for future in scoring for scored in future.result()]


class Sampler:
    """Takes each iteration's sample with the engines holding the policy version it is due from, and under
    rollout.max_staleness 1 the next iteration's in the background while the learner trains."""

    def __init__(self, run: stages.Run, rollout: RolloutGroup, reward: RewardModel, learner: Learner | None,
                 tokenizer, learner_version: int | None, initial_policy: PolicyConfig, prepares_ahead: bool = True):
        """`initial_policy`: pi_0, the reference of the first iteration (stages.reference_policy). `prepares_ahead`:
        the learner computes the reference's log-probabilities while the engines generate (not where they would
        share the same cores: see _learner_preparation)."""
        self.run, self.rollout, self.reward, self.learner, self.tokenizer = run, rollout, reward, learner, tokenizer
        self.initial_policy = initial_policy
        self.prepares_ahead = prepares_ahead
        self.engine_version = 0  # the engines were built from pi_0
        self.engine_step = 0  # semi-online: optimizer steps of the next iteration on top of engine_version
        self.learner_version = learner_version  # the version the learner's weights are, None when between two
        self._ahead: tuple[int, Future[IterationSample]] | None = None

    def sample(self, iteration: int) -> IterationSample:
        """The iteration's sample: the one taken ahead, or one taken now."""
        if self._ahead is not None and self._ahead[0] == iteration:
            return self._wait_ahead()
        self._give_engines_for(iteration)
        return self._take(iteration, self._learner_preparation(iteration))

    def start_ahead(self, iteration: int) -> None:
        """rollout.max_staleness 1: start sampling `iteration` in the background, while the learner trains the
        iteration before it (which the sample therefore cannot come from)."""
        if self.run.cfg.rollout.max_staleness == 0 or iteration > self.run.cfg.iterations:
            return
        self._give_engines_for(iteration)  # here, before the learner moves on: not from the background
        version = self.run.cfg.policy_version(iteration)
        self.rollout.let_learner_move_on(self.run.run_dir.iteration(version) / "policy" if version else None)
        self._ahead = (iteration, in_background(self._take, iteration, name="sample-ahead"))

    def sync(self, iteration: int) -> None:
        """The weights trained in `iteration` go to the engines, once they have finished sampling from the old
        ones; the sync unit is recorded the first time (a resumed process pushes again, unrecorded)."""
        if self._ahead is not None:
            self._wait_ahead()  # under max_staleness 1, the next sample must all come from the weights it started on
        if not self.run.manifest.done(self.run.unit(iteration, "sync")):
            stages.sync(self.run, self.learner, self.rollout, iteration)
        elif self.engine_version != iteration:
            stages.sync_weights(self.learner, self.rollout)
        self.engine_version = self.learner_version = iteration
        self.engine_step = 0

    def sync_within(self, iteration: int, step: int) -> None:
        """Semi-online (train.sync_every_steps): the learner's weights after `step` optimizer steps of `iteration`,
        where it stands, go to the engines; recorded the first time as iter_NNN/sync/step_NNNNNN (a resumed process
        pushes again, unrecorded). Step 0 is the weights the iteration starts from."""
        if step == 0:
            self._give_engines_for(iteration)
            return
        if (self.engine_version, self.engine_step) == (self.run.cfg.policy_version(iteration), step):
            return
        unit = self.run.unit(iteration, f"sync/step_{step:06d}")
        seconds = stages.sync_weights(self.learner, self.rollout)
        if not self.run.manifest.done(unit):
            self.run.manifest.record(unit, seconds=seconds, step=step)
        self.engine_version, self.engine_step = self.run.cfg.policy_version(iteration), step

    def _take(self, iteration: int, on_scored: Callable[[list[Scored]], None] | None = None) -> IterationSample:
        cfg = self.run.cfg
        prompt_set = iteration_prompts(cfg.data, iteration, self.tokenizer, cfg.seed, cfg.environment.factory)
        scored = generate_and_score(self.run, self.rollout, self.reward, prompt_set.prompts, iteration, on_scored)
        return IterationSample(prompt_set, scored, stages.build_pairs(self.run, scored, iteration))

    def _learner_preparation(self, iteration: int) -> Callable[[list[Scored]], None] | None:
        """What hands each scoring shard's pairs (picked as build_pairs picks them) to the learner, which prepares
        the iteration with them while the engines generate; the learner is idle then (a sample taken ahead, while it
        trains, prepares nothing). None when there is no learner, when the pairs are recorded (begin_iteration takes
        them as they are), when the iteration's reference is not exported yet, when the learner shares its GPUs
        with the engines (cluster.colocate: it has their memory only while they sleep, for training), or when the
        sampler was told not to (on the CPU, where the learner's forward passes and vLLM's would share the same
        cores, each running at every core: more threads than cores slowed the toy's generation 1.6x)."""
        run, learner = self.run, self.learner
        reference = stages.reference_policy(run, self.initial_policy, iteration)
        exists = reference == self.initial_policy.model_path or Path(reference).is_dir()
        if (not self.prepares_ahead or learner is None or run.cfg.cluster.colocate
                or run.manifest.done(run.unit(iteration, "pairs")) or not exists):
            return None

        def prepare(scored: list[Scored]) -> None:
            pairs = stages.pick_pairs(run, scored, iteration).pairs
            if pairs:
                learner.prepare_pairs(iteration, pairs, reference)  # not waited for
        return prepare

    def _wait_ahead(self) -> IterationSample:
        _, future = self._ahead
        self._ahead = None
        return future.result()

    def _give_engines_for(self, iteration: int) -> None:
        """Make the engines hold the weights that `iteration` samples from (already there in an uninterrupted run;
        not needed when its pairs are recorded: the sample is only read back)."""
        version = self.run.cfg.policy_version(iteration)
        if ((version, 0) == (self.engine_version, self.engine_step)
                or self.run.manifest.done(self.run.unit(iteration, "pairs"))):
            return
        if version == self.learner_version:
            stages.sync_weights(self.learner, self.rollout)
        else:
            load_exported_policy(self.rollout, self.run.run_dir.iteration(version) / "policy")
        self.engine_version, self.engine_step = version, 0


def learner_version(run: stages.Run) -> int | None:
    """The policy version the learner holds once it loaded the run's newest (intact) checkpoint: pi_0 without one;
    the checkpoint's iteration when that iteration finished training (its export is recorded); None for a checkpoint
    from the middle of an iteration."""
    checkpoints = sorted((unit for unit in run.manifest.units if re.fullmatch(r"iter_\d+/train/step_\d+", unit)),
                         key=unit_order)
    if not checkpoints:
        return 0
    iteration = iteration_of(checkpoints[-1])
    return iteration if run.manifest.done(run.unit(iteration, "export")) else None


def load_exported_policy(rollout: RolloutGroup, directory: Path) -> None:
    """An exported policy's weights into every engine, in memory (through the object store)."""
    import ray

    from policy.rollout_group import exported_weights

    rollout.update_weights(ray.put(exported_weights(directory)))
