"""Online iterative DPO, top to bottom.

    for each iteration:
        the rollout engines sample K responses per prompt from the current policy
        the reward model scores every response
        best-vs-worst pairs are built from the scores
        the learner runs DPO on the fresh pairs (the policy stays in its memory across iterations)
        the new weights go to the rollout engines in memory, and the policy is evaluated

Sampling from the current policy each round is the point: the pairs stay on-policy, which limits the distribution
shift that makes one round of offline DPO fall behind. (`rollout.max_staleness: 1` trades a little of that for
speed: iteration i+1 samples from the policy one update behind while the learner trains iteration i;
`train.sync_every_steps` goes the other way, semi-online: within an iteration the engines get the new weights every s
steps.) Every stage writes its output to the run directory and marks
it finished in the manifest, so `resume` continues from the first unfinished unit of work.
"""

from __future__ import annotations

from concurrent.futures import Future

from omegaconf import OmegaConf

from rlhf_loop.driver import semi_online, stages
from rlhf_loop.cluster.ray_cluster import resolve_device
from rlhf_loop.config import RunConfig
from rlhf_loop.driver.data import evaluation_prompts
from rlhf_loop.common.hf_models import load_tokenizer
from rlhf_loop.driver.metrics import Tracker, pair_metrics, prompt_metrics, reward_metrics
from rlhf_loop.cluster.roles import Started, start_actors
from rlhf_loop.rundir.manifest import Manifest, RunDir
from rlhf_loop.driver.sampler import Sampler, learner_version


def run(cfg: RunConfig, run_dir: RunDir, early_actors: Future[Started] | None = None) -> None:
    """The run in `run_dir`, from its first unfinished unit of work; Ray is already running (`ray_running`), and
    the actors may be starting already (`launch_early`)."""
    run = stages.Run(cfg, run_dir, Manifest.load(run_dir))
    device = resolve_device(cfg.device)
    tracker = Tracker(run_dir, cfg.wandb, OmegaConf.to_container(OmegaConf.structured(cfg)))
    try:
        # ---- pi_0: the policy every role starts from (after an optional SFT warm start) -------------------------
        initial_policy = stages.sft_warm_start(run, device) if cfg.sft.enabled else cfg.policy
        tokenizer = load_tokenizer(initial_policy.tokenizer_source, initial_policy.trust_remote_code)

        # ---- the actors: rollout engines, reward model, DPO learner, started at once -------------------------
        rollout, reward, learner = start_actors(run, initial_policy, device, early_actors)

        # ---- resume: the learner reloads its last checkpoint; the engines get, before each sample, the weights
        # ---- it is due from (rollout.max_staleness), so a resumed run samples what an uninterrupted one did
        checkpoint = run.manifest.intact_checkpoint("train/step_")  # a damaged newest one falls back
        if checkpoint is not None:
            learner.load_checkpoint(str(checkpoint))
        sampler = (Sampler(run, rollout, reward, learner, tokenizer, learner_version(run), initial_policy,
                           prepares_ahead=device != "cpu")  # on CPU the learner would share the engines' cores
                   if cfg.online else None)

        # ---- the baseline: pi_0 on the held-out prompts, for win rates and the gold curve -------------------
        eval_set = evaluation_prompts(cfg, tokenizer) if cfg.evaluates else []
        gold = stages.load_gold(cfg.eval)
        if cfg.evaluates:
            stages.evaluate(run, rollout, reward, learner, eval_set, None, gold)

        for iteration in range(1, cfg.iterations + 1):
            if run.manifest.done(run.unit(iteration, "done")):
                continue
            reference = stages.reference_policy(run, initial_policy, iteration)  # DPO's: pi_0 or the previous policy
            train_metrics = None
            if cfg.online:
                # ---- generate K samples per prompt; score each shard while the next generates; pair best vs
                # ---- worst (ties and identical texts dropped). Under max_staleness 1 it was sampled ahead.
                # ---- Semi-online (train.sync_every_steps): sampled and trained in blocks of s steps, the engines
                # ---- getting the learner's weights before each block
                if cfg.train.sync_every_steps:
                    sample, train_metrics = semi_online.sample_and_train(sampler, learner, iteration, reference)
                else:
                    sample = sampler.sample(iteration)
                selection = sample.selection
                metrics = {**reward_metrics(sample.scored, selection.pairs), **prompt_metrics(sample.prompt_set)}
            else:
                selection, metrics = stages.dataset_pairs(run, tokenizer, iteration), {}
            metrics.update(pair_metrics(selection, cfg.train if learner is not None else None))
            stages.export_pairs(run, selection.pairs, iteration)

            if learner is not None:
                if cfg.online:
                    # ---- max_staleness 1: the next iteration samples, from the engines' weights, while we train --
                    sampler.start_ahead(iteration + 1)

                # ---- train: DPO on the fresh pairs, against pi_0 or the previous policy (semi-online: done) ------
                if train_metrics is None:
                    with stages.engines_asleep(rollout, learner):  # colocated engines give the learner their GPUs
                        train_metrics = stages.train(run, learner, selection.pairs, iteration, reference)
                metrics.update({f"dpo/{key}": value for key, value in train_metrics.items()})
                stages.export_policy(run, learner, iteration)

            if cfg.online and learner is not None:
                # ---- sync: the new weights go to every rollout engine, in memory, once they finished sampling ---
                sampler.sync(iteration)
            if cfg.evaluates:
                # ---- evaluate: the new policy on the held-out prompts ------------------------------------------
                metrics.update(stages.evaluate(run, rollout, reward, learner, eval_set, iteration, gold))

            tracker.log(iteration, stages.finish_iteration(run, iteration, metrics))
    finally:
        tracker.close()
