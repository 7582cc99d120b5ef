"""Semi-online DPO (`train.sync_every_steps: s`): an iteration is sampled and trained in blocks, so that each block of
s optimizer steps trains on pairs sampled from the weights the steps before it made.

    for each block of s x global batch / pairs.per_prompt of the iteration's prompts:
        the engines get the learner's weights (after the steps trained so far in the iteration; the first block
        samples from the weights the iteration starts from)
        the block is generated, scored and paired
        the learner trains on its pairs: at most s steps, under the iteration's one learning-rate schedule

With one iteration it sits between one round of offline DPO on pi_0's samples (no sync within the round) and online
DPO (fresh weights every iteration); Meta's study of semi-online DPO (arXiv 2506.21495) found syncing every few
steps nearly as good as fully online.

The units of work stay those of an iteration: generation and scoring shards (a block's shards numbered on from the
blocks before it), `train.save_steps` steps with a checkpoint at the end of every block as well, each sync within the
iteration (iter_NNN/sync/step_NNNNNN), and the iteration's pairs (iter_NNN/pairs: those the blocks trained on, each
with the step of the weights that sampled it, `policy_step`). Resume reads finished blocks back, trains nothing twice,
and before sampling a block gives the engines the weights the learner checkpointed at the block's first step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from rlhf_loop.common.arithmetic import ceil_div
from rlhf_loop.config import RunConfig
from rlhf_loop.driver import stages
from rlhf_loop.driver.data import iteration_prompts
from rlhf_loop.driver.sampler import Block, IterationSample, Sampler, generate_and_score

if TYPE_CHECKING:  # it imports Ray
    from policy.learner_protocol import Learner
    from rlhf_loop.common.records import Pair


def plan_blocks(cfg: RunConfig, num_prompts: int) -> list[Block]:
    """The blocks of an iteration of `num_prompts` prompts (policy_step is filled in as the blocks are trained)."""
    size = cfg.sync_block_prompts
    starts = range(0, num_prompts, size)
    own_rollout = [ceil_div(min(size, num_prompts - start), cfg.rollout.shard_size) for start in starts]
    own_score = [ceil_div(min(size, num_prompts - start), cfg.reward.shard_size) for start in starts]
    return [Block(start, min(start + size, num_prompts), 0, sum(own_rollout[:index]), sum(own_score[:index]),
                  sum(own_rollout), sum(own_score)) for index, start in enumerate(starts)]


def sample_and_train(sampler: Sampler, learner: Learner, iteration: int, reference_dir: str
                     ) -> tuple[IterationSample, dict[str, float]]:
    """The iteration, block by block; returns what it sampled (its pairs recorded as iter_NNN/pairs) and the
    step-weighted means of its training statistics."""
    run, cfg = sampler.run, sampler.run.cfg
    prompt_set = iteration_prompts(cfg.data, iteration, sampler.tokenizer, cfg.seed)
    blocks = plan_blocks(cfg, len(prompt_set.prompts))
    # the learning-rate schedule's length: s steps a block (fewer for a last, shorter one) when no pair is dropped
    planned_steps = sum(ceil_div((block.end - block.start) * cfg.pairs.per_prompt, cfg.train.global_batch_size)
                        for block in blocks)
    chunks = run.unit(iteration, "train/step_")
    step, scored = 0, []
    for block in blocks:
        block = replace(block, policy_step=step)
        if not _sampled(run, iteration, block):
            if stages.steps_recorded(run, chunks) != step:  # blocks are trained in order, each ending in a checkpoint
                raise RuntimeError(f"iteration {iteration}: the learner is not at step {step}, where the block of "
                                   f"prompts {block.start}-{block.end} is due to sample from")
            sampler.sync_within(iteration, step)
        block_scored = generate_and_score(run, sampler.rollout, sampler.reward,
                                          prompt_set.prompts[block.start:block.end], iteration, block=block)
        pairs = stages.pick_pairs(run, block_scored, iteration).pairs
        end = step + ceil_div(len(pairs), cfg.train.global_batch_size)
        if stages.steps_recorded(run, chunks) < end:
            _train_block(sampler, learner, pairs, iteration, reference_dir, step, end, planned_steps)
        step, scored = end, scored + block_scored
    sample = IterationSample(prompt_set, scored, stages.build_pairs(run, scored, iteration))
    return sample, stages.chunk_means(run, chunks)


def _sampled(run: stages.Run, iteration: int, block: Block) -> bool:
    """Whether every generation shard of the block is recorded, intact (then it is only read back)."""
    own = ceil_div(block.end - block.start, run.cfg.rollout.shard_size)
    return all(run.manifest.done_and_intact(run.unit(iteration, f"rollouts/shard_{index:05d}"))
               for index in range(block.first_rollout_shard, block.first_rollout_shard + own))


def _train_block(sampler: Sampler, learner: Learner, pairs: Sequence[Pair], iteration: int, reference_dir: str,
                 first_step: int, end: int, planned_steps: int) -> None:
    """The block's steps, from where the learner stands in it; the last chunk ends at the block's end, so the
    weights the next block samples from are checkpointed."""
    run = sampler.run
    began = time.perf_counter()
    with stages.engines_asleep(sampler.rollout, learner):
        used_up = learner.begin_iteration(iteration, list(pairs), reference_dir, first_step=first_step,
                                          planned_steps=planned_steps)
        if used_up != end:
            raise RuntimeError(f"iteration {iteration}: the learner plans {used_up - first_step} steps for the "
                               f"block from step {first_step}, the driver {end - first_step}")
        stages.train_in_chunks(run, learner, end, run.cfg.train.save_steps, "train/step_",
                               run.unit(iteration, "train/step_"), run.run_dir.iteration(iteration) / "learner",
                               f"iter {iteration} train", setup_s=time.perf_counter() - began)
    sampler.learner_version = None  # between two versions until the iteration ends
