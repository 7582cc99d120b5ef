"""Semi-online DPO (train.sync_every_steps) with fakes whose weights are a step count: the engines answer with the
step of the weights they hold, so each pair shows which weights sampled it. That the engines get the learner's weights
every s steps, that every pair after a sync comes from the synced weights and says so (policy_step), and that a
process killed in the middle of an iteration resumes to the same pairs without doing a unit twice."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
from test_sampler import Tokenizer, prompt_file
from test_stages import LengthReward, make_config, new_run

from policy.learner_protocol import TrainStats
from rlhf_loop.common.errors import ConfigError
from rlhf_loop.common.records import Response, Rollout
from rlhf_loop.config import load_config
from rlhf_loop.driver import semi_online
from rlhf_loop.driver.sampler import Sampler
from rlhf_loop.rundir.manifest import RunDir


class StepLearner:
    """Like DPOLearner in what the loop sees: an iteration's pairs come in blocks, each from its first step on; its
    weights are the number of steps trained. `crash_at` makes train_steps fail once it would pass that step."""

    def __init__(self, global_batch: int, crash_at: int | None = None):
        self.global_batch, self.crash_at = global_batch, crash_at
        self.iteration, self.step, self.first_step, self.end = None, 0, 0, 0
        self.begins: list[tuple[int, int, int | None]] = []  # (first_step, pairs, planned_steps)

    def begin_iteration(self, iteration, pairs, reference_dir, first_step=0, planned_steps=None):
        if (iteration, first_step) == (self.iteration, self.first_step):
            pass  # the block a loaded checkpoint is in: go on from its step
        elif first_step > 0:
            assert (iteration, first_step) == (self.iteration, self.step), "a block given before the one before it"
        else:
            self.step = 0
        self.begins.append((first_step, len(pairs), planned_steps))
        self.iteration, self.first_step = iteration, first_step
        self.end = first_step + math.ceil(len(pairs) / self.global_batch)
        return self.end

    def train_steps(self, max_steps):
        target = min(self.step + max_steps, self.end)
        if self.crash_at is not None and target > self.crash_at:
            raise RuntimeError("killed while training")
        self.step = target
        return TrainStats(step=self.step, total_steps=self.end, loss=1.0, reward_accuracy=1.0, margin=1.0,
                          chosen_reward=1.0, rejected_reward=0.0, learning_rate=1e-3)

    def save_checkpoint(self, directory):
        Path(directory).mkdir(parents=True)
        state = {"iteration": self.iteration, "step": self.step, "first_step": self.first_step}
        (Path(directory) / "state.json").write_text(json.dumps(state))

    def load_checkpoint(self, directory):
        state = json.loads((Path(directory) / "state.json").read_text())
        self.iteration, self.step, self.first_step = state["iteration"], state["step"], state["first_step"]


class StepEngines:
    """Answers every prompt with two texts of different length that name the step of the weights it holds."""

    def __init__(self):
        self.held = 0  # the weights it was built from: pi_0, no step
        self.syncs: list[int] = []

    def generate(self, prompts, sampling):
        texts = [f"w{self.held}", f"w{self.held}-longer"]
        return [Rollout(p, [Response(t, list(range(len(t))), "stop") for t in texts]) for p in prompts]

    def sync_from(self, learner):
        self.held = learner.step
        self.syncs.append(learner.step)

    def asleep(self, learner):  # the engines of cluster.colocate sleep while the learner trains; these stay awake
        return contextlib.nullcontext()


def semi_online_run(run_dir, tmp_path, **train):
    """10 prompts; blocks of 2 steps x a global batch of 2 pairs = 4 prompts: prompts 0-3, 4-7, 8-9."""
    cfg = make_config(iterations=1, rollout={"samples_per_prompt": 2, "shard_size": 3}, reward={"shard_size": 2},
                      train={"sync_every_steps": 2, "micro_batch_size": 2, "save_steps": 3, **train},
                      data={"prompts": [prompt_file(tmp_path, 10)], "prompts_per_iteration": 10, "shuffle": False})
    return new_run(run_dir, cfg)


def sample_and_train(run, engines, learner):
    sampler = Sampler(run, engines, LengthReward(), learner, Tokenizer(), learner_version=0,
                      initial_policy=run.cfg.policy)
    return semi_online.sample_and_train(sampler, learner, 1, "pi_0")


@pytest.fixture
def run_dir(tmp_path):
    return RunDir.create(tmp_path / "run", overwrite=False)


def test_the_engines_get_the_learner_s_weights_every_s_steps_and_later_pairs_come_from_them(run_dir, tmp_path):
    run, engines, learner = semi_online_run(run_dir, tmp_path), StepEngines(), StepLearner(global_batch=2)
    sample, _ = sample_and_train(run, engines, learner)

    assert engines.syncs == [2, 4]  # every s = 2 steps, before the second and third block
    assert sorted(u for u in run.manifest.units if u.startswith("iter_001/sync/")) == [
        "iter_001/sync/step_000002", "iter_001/sync/step_000004"]
    pairs = sample.selection.pairs
    assert [p.prompt_index for p in pairs] == list(range(10))
    # each pair was sampled by the weights it says, and those are the synced ones: 4 prompts a block
    assert [p.policy_step for p in pairs] == [0] * 4 + [2] * 4 + [4] * 2
    assert all(p.chosen.text.split("-")[0] == f"w{p.policy_step}" for p in pairs)
    assert learner.begins == [(0, 4, 5), (2, 4, 5), (4, 2, 5)]  # one schedule of 2 + 2 + 1 steps
    # every chunk of training ends at a block's end too, so each sync's weights are checkpointed
    assert sorted(u for u in run.manifest.units if "/train/step_" in u) == [
        f"iter_001/train/step_{step:06d}" for step in (2, 4, 5)]
    # shards are numbered on across blocks (4 prompts: 2 generation shards of 3, 2 scoring shards of 2)
    rollouts = {u: i for u, i in run.manifest.units.items() if u.startswith("iter_001/rollouts/")}
    assert [(i["policy_step"], i["of_shards"], i["items"]) for _, i in sorted(rollouts.items())] == [
        (0, 5, 3), (0, 5, 1), (2, 5, 3), (2, 5, 1), (4, 5, 2)]
    assert len([u for u in run.manifest.units if u.startswith("iter_001/scores/")]) == 5
    recorded = [json.loads(line) for line in (run_dir.iteration(1) / "pairs.jsonl").read_text().splitlines()]
    assert [row["policy_step"] for row in recorded] == [p.policy_step for p in pairs]


def test_killed_in_the_middle_it_resumes_to_the_same_pairs_and_does_no_unit_twice(run_dir, tmp_path):
    expected, _ = sample_and_train(semi_online_run(RunDir.create(tmp_path / "whole", overwrite=False), tmp_path),
                                   StepEngines(), StepLearner(global_batch=2))

    with pytest.raises(RuntimeError, match="killed while training"):  # in block 2, past step 2's checkpoint
        sample_and_train(semi_online_run(run_dir, tmp_path), StepEngines(), StepLearner(2, crash_at=3))
    run = semi_online_run(run_dir, tmp_path)
    assert "iter_001/rollouts/shard_00003" in run.manifest.units and "iter_001/train/step_000004" not in run.manifest.units

    learner, engines = StepLearner(global_batch=2), StepEngines()  # a new process: fresh engines (pi_0)
    learner.load_checkpoint(run.manifest.intact_checkpoint("train/step_"))
    resumed, _ = sample_and_train(run, engines, learner)
    assert resumed.selection.pairs == expected.selection.pairs
    assert engines.syncs == [4]  # block 2 was sampled before the kill: read back; block 3 gets step 4's weights
    journal = [json.loads(line)["unit"] for line in run_dir.journal_path.read_text().splitlines()]
    assert len(journal) == len(set(journal))  # no unit recorded twice


def test_a_process_killed_before_a_block_was_sampled_gives_the_engines_the_checkpointed_weights(run_dir, tmp_path):
    class DiesOnTheThirdBlock(StepEngines):
        def generate(self, prompts, sampling):
            if prompts[0].index == 8:
                raise RuntimeError("killed while generating")
            return super().generate(prompts, sampling)

    with pytest.raises(RuntimeError, match="killed while generating"):
        sample_and_train(semi_online_run(run_dir, tmp_path), DiesOnTheThirdBlock(), StepLearner(global_batch=2))
    run, learner, engines = semi_online_run(run_dir, tmp_path), StepLearner(global_batch=2), StepEngines()
    learner.load_checkpoint(run.manifest.intact_checkpoint("train/step_"))
    sample, _ = sample_and_train(run, engines, learner)
    assert engines.syncs == [4]  # pushed again, from the learner that loaded step 4's checkpoint
    assert [p.policy_step for p in sample.selection.pairs][-2:] == [4, 4]
    assert all(p.chosen.text.split("-")[0] == f"w{p.policy_step}" for p in sample.selection.pairs)


@pytest.mark.parametrize(("override", "message"), [
    ("rollout.max_staleness=1", "set rollout.max_staleness: 0"),
    ("train.epochs=2", "set train.epochs: 1"),
    ("train.sync_every_steps=0", "train.sync_every_steps must be >= 1"),
    ("train.enabled=false", "it needs sampled pairs and training"),
])
def test_semi_online_refuses_what_it_cannot_do(tmp_path, override, message):
    config = tmp_path / "run.yaml"
    config.write_text(f"policy: {{model_path: p}}\nreward: {{model_path: r}}\n"
                      f"data: {{prompts: [{prompt_file(tmp_path)}]}}\n")
    assert load_config(config, ["train.sync_every_steps=4"]).sync_block_prompts == 4  # 4 steps x batch 1
    with pytest.raises(ConfigError, match=message):
        load_config(config, ["train.sync_every_steps=4", override])
