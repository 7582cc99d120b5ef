"""The stages of one iteration, with small fakes for the learner, the rollout engines and the reward model: what
each stage records in the manifest, and that a second call (a resumed process) re-reads finished units instead of
redoing them."""

from __future__ import annotations

import dataclasses
import json
import time
import math
import random
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from policy.config import PolicyConfig
from policy.learner_protocol import TrainStats
from policy.rollout_protocol import Sampling
from reward.base import RewardResult
from rlhf_loop.common import records
from rlhf_loop.driver import stages
from rlhf_loop.config import RunConfig
from rlhf_loop.common.errors import UserError
from rlhf_loop.rundir.heartbeat import read_heartbeat
from rlhf_loop.common.records import Prompt, Response, Rollout, Scored
from rlhf_loop.rundir.manifest import Manifest, RunDir
from rlhf_loop.common.files import read_jsonl
from rlhf_loop.common.seeds import derived_seed

STAT_FIELDS = [f.name for f in dataclasses.fields(TrainStats) if f.name not in ("step", "total_steps")]


def make_config(**sections) -> RunConfig:
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), {"policy": {"model_path": "any/policy"}}, sections)
    return OmegaConf.to_object(merged)


@pytest.fixture
def run_dir(tmp_path):
    return RunDir.create(tmp_path / "run", overwrite=False)


def new_run(run_dir: RunDir, cfg: RunConfig | None = None) -> stages.Run:
    """A Run as a (re)started process sees it: the manifest read back from disk."""
    return stages.Run(cfg or make_config(), run_dir, Manifest.load(run_dir))


def prompt(index: int) -> Prompt:
    return Prompt(index, [{"role": "user", "content": f"prompt {index}"}], [1, 2, index + 3], {"id": index})


def rollout_of(index: int, texts: list[str]) -> Rollout:
    return Rollout(prompt(index), [Response(t, list(range(len(t))), "stop") for t in texts])


# ---- fakes --------------------------------------------------------------------------------------------------------

class FakeRollout:
    """Answers each prompt with `texts(prompt_index)`, records every call."""

    def __init__(self, texts=lambda index: [f"r{index}a", f"r{index}bb"]):
        self.texts = texts
        self.calls: list[tuple[list[int], Sampling]] = []
        self.synced_from: list[object] = []  # learners the weights came from (sync_from)
        self.weights: list[object] = []  # object-store refs loaded (update_weights)
        self.restart_sources: list[object] = []  # what let_learner_move_on was told

    def generate(self, prompts, sampling):
        self.calls.append(([p.index for p in prompts], sampling))
        return [Rollout(p, [Response(t, list(range(len(t))), "stop") for t in self.texts(p.index)]) for p in prompts]

    def sync_from(self, learner):
        self.synced_from.append(learner)

    def update_weights(self, ref):
        self.weights.append(ref)

    def let_learner_move_on(self, export):
        self.restart_sources.append(export)


class LengthReward:
    """Score = response length; objective "len" the same, "neg" its negative."""

    def __init__(self):
        self.queries = []

    def score(self, queries):
        self.queries += list(queries)
        lengths = [[float(len(r)) for r in q.responses] for q in queries]
        return [RewardResult(values, {"len": values, "neg": [-v for v in values]}) for values in lengths]


class FakeLearner:
    """Trains `total_steps` steps an iteration; loss = the step reached, so chunk means are easy to check."""

    def __init__(self, total_steps: int = 10, fail_on_call: int | None = None):
        self.total_steps, self.fail_on_call = total_steps, fail_on_call
        self.step, self.iteration = 0, None
        self.setup_s = 0.0
        self.calls: list[tuple] = []

    def begin_iteration(self, iteration, pairs, reference_dir):
        """Like DPOLearner: continues from a loaded checkpoint of the same iteration, else starts at step 0."""
        self.calls.append(("begin_iteration", iteration, len(pairs), reference_dir))
        time.sleep(self.setup_s)  # the reference log-probs and tokenisation
        if iteration != self.iteration:
            self.step = 0
        self.iteration = iteration
        return self.total_steps

    def prepare_pairs(self, iteration, pairs, reference_dir):
        self.calls.append(("prepare_pairs", iteration, [p.prompt_index for p in pairs], reference_dir))

    def train_steps(self, max_steps):
        self.calls.append(("train_steps", max_steps))
        if self.fail_on_call is not None and sum(c[0] == "train_steps" for c in self.calls) == self.fail_on_call:
            raise RuntimeError("crash in training")
        self.step = min(self.step + max_steps, self.total_steps)
        s = float(self.step)
        return TrainStats(step=self.step, total_steps=self.total_steps, loss=s, reward_accuracy=s / 100,
                          margin=2 * s, chosen_reward=s + 1, rejected_reward=s - 1, learning_rate=1e-3)

    def save_checkpoint(self, directory):
        self.calls.append(("save_checkpoint", directory))
        Path(directory).mkdir(parents=True)
        (Path(directory) / "state.json").write_text(json.dumps({"step": self.step, "iteration": self.iteration}))

    def load_checkpoint(self, directory):
        self.calls.append(("load_checkpoint", directory))
        state = json.loads((Path(directory) / "state.json").read_text())
        self.step, self.iteration = state["step"], state["iteration"]

    def export_hf(self, directory):
        self.calls.append(("export_hf", directory))
        Path(directory).mkdir(parents=True, exist_ok=True)  # the real one replaces an earlier export
        (Path(directory) / "config.json").write_text("{}")

    def log_ratios(self, prompt_token_ids, response_token_ids):
        self.calls.append(("log_ratios", prompt_token_ids, response_token_ids))
        return [0.5 * len(r) - 0.1 * len(p) for p, r in zip(prompt_token_ids, response_token_ids)]


# ---- run_sharded ----------------------------------------------------------------------------------------------------

def test_run_sharded_cuts_records_and_rereads_finished_shards(run_dir):
    run, calls = new_run(run_dir), []

    def work(shard):
        calls.append(list(shard))
        return [10 * x for x in shard]

    args = (lambda r: {"v": r}, lambda row: row["v"])
    assert stages.run_sharded(run, 1, "things", list(range(7)), 3, work, *args) == [10 * x for x in range(7)]
    assert calls == [[0, 1, 2], [3, 4, 5], [6]]
    for index, size in enumerate([3, 3, 1]):
        info = run.manifest.info(f"iter_001/things/shard_{index:05d}")
        assert (info["items"], info["of_shards"]) == (size, 3)
        assert info["files"][0]["path"] == f"iter_001/things/shard_{index:05d}.jsonl"
    assert [row["v"] for row in read_jsonl(run_dir.iteration(1) / "things" / "shard_00001.jsonl")] == [30, 40, 50]

    again = stages.run_sharded(new_run(run_dir), 1, "things", list(range(7)), 3, work, *args)
    assert again == [10 * x for x in range(7)]
    assert len(calls) == 3  # nothing redone
    assert read_heartbeat(run_dir)["stage"] == "iter_001/things/shard_00002"  # the last unit worked on


def test_run_sharded_redoes_only_the_unfinished_shard(run_dir):
    args = (lambda r: {"v": r}, lambda row: row["v"])

    def crashes_on_second_shard(shard):
        if 3 in shard:
            raise RuntimeError("killed")
        return [x + 100 for x in shard]

    with pytest.raises(RuntimeError):
        stages.run_sharded(new_run(run_dir), 2, "s", list(range(7)), 3, crashes_on_second_shard, *args)
    calls = []

    def work(shard):
        calls.append(list(shard))
        return [x + 100 for x in shard]

    run = new_run(run_dir)
    assert stages.run_sharded(run, 2, "s", list(range(7)), 3, work, *args) == [x + 100 for x in range(7)]
    assert calls == [[3, 4, 5], [6]]
    assert sorted(u for u in run.manifest.units if u.startswith("iter_002/s/")) == [
        f"iter_002/s/shard_{i:05d}" for i in range(3)]


def test_a_damaged_shard_file_is_redone(run_dir):
    args = (lambda r: {"v": r}, lambda row: row["v"])
    calls = []

    def work(shard):
        calls.append(list(shard))
        return [x * 2 for x in shard]

    stages.run_sharded(new_run(run_dir), 1, "s", [1, 2, 3], 2, work, *args)
    (run_dir.iteration(1) / "s" / "shard_00001.jsonl").write_text('{"v": 99}\n')
    assert stages.run_sharded(new_run(run_dir), 1, "s", [1, 2, 3], 2, work, *args) == [2, 4, 6]
    assert calls == [[1, 2], [3], [3]]
    assert new_run(run_dir).manifest.verify_unit("iter_001/s/shard_00001") is None


# ---- scoring ---------------------------------------------------------------------------------------------------------

def test_score_rollouts_keeps_order_and_objectives():
    rollouts = [rollout_of(0, ["abc", "a"]), rollout_of(1, ["xy", "wxyz", ""])]
    reward = LengthReward()
    scored = stages.score_rollouts(reward, rollouts, length_penalty=0.0)
    assert [s.rollout for s in scored] == rollouts
    assert [s.scores for s in scored] == [[3.0, 1.0], [2.0, 4.0, 0.0]]
    assert scored[1].objectives == {"len": [2.0, 4.0, 0.0], "neg": [-2.0, -4.0, -0.0]}
    assert [(q.messages, q.responses, q.meta) for q in reward.queries] == [
        (r.prompt.messages, [x.text for x in r.responses], r.prompt.meta) for r in rollouts]


# ---- pairs -----------------------------------------------------------------------------------------------------------

def test_build_pairs_records_pairs_and_reads_them_back(run_dir, monkeypatch):
    scored = [
        Scored(rollout_of(0, ["mid", "best", "worst"]), [0.5, 2.0, -1.0]),
        Scored(rollout_of(1, ["same", "same"]), [1.0, 0.0]),  # identical texts
        Scored(rollout_of(2, ["x", "y"]), [3.0, 3.0]),  # tie
        Scored(rollout_of(3, ["low", "high"]), [0.0, 0.25]),
    ]
    selection = stages.build_pairs(new_run(run_dir), scored, 1)
    expected = []
    for item in scored:
        order = sorted(range(len(item.scores)), key=item.scores.__getitem__)
        worst, best = order[0], order[-1]
        texts = [r.text for r in item.rollout.responses]
        if texts[best] != texts[worst] and item.scores[best] > item.scores[worst]:
            expected.append((item.rollout.prompt.index, texts[best], texts[worst]))
    assert [(p.prompt_index, p.chosen.text, p.rejected.text) for p in selection.pairs] == expected
    assert selection.dropped == {"identical": 1, "tie": 1}

    run = new_run(run_dir)
    assert run.manifest.info("iter_001/pairs")["count"] == len(expected)
    monkeypatch.setattr(stages, "select_pairs", lambda *a, **k: pytest.fail("finished pairs were selected again"))
    assert stages.build_pairs(run, scored, 1) == selection


# ---- training --------------------------------------------------------------------------------------------------------

def test_train_without_pairs_returns_nan_stats_and_touches_no_learner(run_dir):
    learner = FakeLearner()
    stats = stages.train(new_run(run_dir), learner, [], 1, None)
    assert sorted(stats) == sorted(STAT_FIELDS)
    assert all(math.isnan(v) for v in stats.values())
    assert learner.calls == []


def some_pairs(count: int = 3):
    selection = stages.select_pairs([Scored(rollout_of(i, ["a", "bb"]), [0.0, 1.0]) for i in range(count)],
                                    "max_min", 0.0, 0)
    return selection.pairs


def test_train_records_a_unit_per_chunk_keeps_the_newest_two_checkpoints_and_averages_by_steps(run_dir):
    cfg = make_config(train={"save_steps": 4})
    learner, run = FakeLearner(total_steps=10), new_run(run_dir, cfg)
    means = stages.train(run, learner, some_pairs(), 1, "ref/dir")

    assert learner.calls[0] == ("begin_iteration", 1, 3, "ref/dir")
    assert [c[1] for c in learner.calls if c[0] == "train_steps"] == [4, 4, 2]
    units = sorted(u for u in run.manifest.units if u.startswith("iter_001/train/"))
    assert units == ["iter_001/train/step_000004", "iter_001/train/step_000008", "iter_001/train/step_000010"]
    assert [run.manifest.info(u)["steps"] for u in units] == [4, 4, 2]
    assert run.manifest.info(units[-1])["checkpoint"] == "iter_001/learner/step_000010"
    assert sorted(p.name for p in (run_dir.iteration(1) / "learner").iterdir()) == ["step_000008", "step_000010"]
    assert {f["path"] for f in run.manifest.info(units[-1])["files"]} == {"iter_001/learner/step_000010/state.json"}
    # loss = the step reached at the end of each chunk, weighted by the chunk's steps
    assert means["loss"] == pytest.approx((4 * 4 + 8 * 4 + 10 * 2) / 10)
    assert means["margin"] == pytest.approx(2 * (4 * 4 + 8 * 4 + 10 * 2) / 10)
    assert set(means) == set(STAT_FIELDS)


def test_the_learners_set_up_counts_as_training_time(run_dir):
    learner, run = FakeLearner(total_steps=8), new_run(run_dir, make_config(train={"save_steps": 4}))
    learner.setup_s = 0.3
    stages.train(run, learner, some_pairs(), 1, None)
    first, second = (run.manifest.info(f"iter_001/train/step_00000{n}")["seconds"] for n in (4, 8))
    assert first >= 0.3 > second


def test_train_resumes_at_the_recorded_step(run_dir):
    cfg = make_config(train={"save_steps": 4})
    crashing = FakeLearner(total_steps=10, fail_on_call=2)
    with pytest.raises(RuntimeError):
        stages.train(new_run(run_dir, cfg), crashing, some_pairs(), 1, None)

    run = new_run(run_dir, cfg)
    checkpoint = run.manifest.intact_checkpoint("train/step_")  # as the loop finds it at start-up
    assert checkpoint == run_dir.iteration(1) / "learner" / "step_000004"
    resumed = FakeLearner(total_steps=10)
    resumed.load_checkpoint(str(checkpoint))  # what the loop does at start-up
    means = stages.train(run, resumed, some_pairs(), 1, None)
    assert [c[1] for c in resumed.calls if c[0] == "train_steps"] == [4, 2]
    assert means["loss"] == pytest.approx((4 * 4 + 8 * 4 + 10 * 2) / 10)  # the crashed process's chunk counts too
    assert sorted(u for u in run.manifest.units if u.startswith("iter_001/train/")) == [
        "iter_001/train/step_000004", "iter_001/train/step_000008", "iter_001/train/step_000010"]
    assert sorted(p.name for p in (run_dir.iteration(1) / "learner").iterdir()) == ["step_000008", "step_000010"]


def test_a_new_iteration_removes_the_previous_iterations_checkpoints_and_their_empty_directory(run_dir):
    cfg = make_config(train={"save_steps": 2})
    learner = FakeLearner(total_steps=4)
    stages.train(new_run(run_dir, cfg), learner, some_pairs(), 1, None)
    assert sorted(p.name for p in (run_dir.iteration(1) / "learner").iterdir()) == ["step_000002", "step_000004"]
    run = new_run(run_dir, cfg)
    learner.fail_on_call = 4  # the second chunk of iteration 2
    with pytest.raises(RuntimeError):
        stages.train(run, learner, some_pairs(), 2, None)
    # the newest two over both iterations: iteration 1's last, iteration 2's first
    assert sorted(p.name for p in (run_dir.iteration(1) / "learner").iterdir()) == ["step_000004"]
    assert sorted(p.name for p in (run_dir.iteration(2) / "learner").iterdir()) == ["step_000002"]
    learner.fail_on_call = None
    stages.train(new_run(run_dir, cfg), learner, some_pairs(), 2, None)
    assert not (run_dir.iteration(1) / "learner").exists()
    assert sorted(p.name for p in (run_dir.iteration(2) / "learner").iterdir()) == ["step_000002", "step_000004"]


def test_checkpoints_are_kept_and_found_by_iteration_number_past_999(run_dir):
    cfg = make_config(train={"save_steps": 2})
    learner = FakeLearner(total_steps=4)
    for iteration in (999, 1000, 1001):
        stages.train(new_run(run_dir, cfg), learner, some_pairs(), iteration, None)
        # the newest two are this iteration's: every earlier iteration's are removed, never this one's
        assert sorted(p.name for p in (run_dir.iteration(iteration) / "learner").iterdir()) == [
            "step_000002", "step_000004"]
        assert not (run_dir.iteration(iteration - 1) / "learner").exists()
        assert stages.final_checkpoint(new_run(run_dir, cfg), iteration) == (
            run_dir.iteration(iteration) / "learner" / "step_000004")
    assert stages.final_checkpoint(new_run(run_dir, cfg), 1000) is None  # iteration 1001 trained after it


def test_chunk_means_are_step_weighted_and_only_of_the_prefix(run_dir):
    run = new_run(run_dir)
    assert stages.chunk_means(run, "iter_001/train/step_") == {}
    chunks = [(3, 1.0, 0.5), (1, 5.0, 0.25)]
    for step, (steps, loss, accuracy) in enumerate(chunks, start=1):
        run.manifest.record(f"iter_001/train/step_{step:06d}", steps=steps, loss=loss, reward_accuracy=accuracy,
                            seconds=100.0 * step)
    run.manifest.record("iter_002/train/step_000001", steps=7, loss=1000.0, reward_accuracy=1.0, seconds=1.0)
    means = stages.chunk_means(run, "iter_001/train/step_")
    total = sum(c[0] for c in chunks)
    assert means == pytest.approx({"loss": sum(c[0] * c[1] for c in chunks) / total,
                                   "reward_accuracy": sum(c[0] * c[2] for c in chunks) / total})


# ---- export, sync, reference -----------------------------------------------------------------------------------------

def test_export_policy_is_done_once(run_dir):
    learner = FakeLearner()
    directory = stages.export_policy(new_run(run_dir), learner, 2)
    assert directory == run_dir.iteration(2) / "policy" and (directory / "config.json").is_file()
    run = new_run(run_dir)
    assert run.manifest.info("iter_002/export")["path"] == "iter_002/policy"
    assert stages.export_policy(run, learner, 2) == directory
    assert [c[0] for c in learner.calls] == ["export_hf"]


def test_a_damaged_export_cannot_be_redone_and_says_so(run_dir):
    learner = FakeLearner()
    directory = stages.export_policy(new_run(run_dir), learner, 2)
    (directory / "config.json").write_text("{ }")
    with pytest.raises(UserError, match=r"config\.json.*iteration 2"):
        stages.export_policy(new_run(run_dir), learner, 2)
    assert [c[0] for c in learner.calls] == ["export_hf"]


def test_a_damaged_export_is_rebuilt_from_the_iteration_s_final_checkpoint(run_dir):
    learner = FakeLearner()
    run = new_run(run_dir)
    checkpoint = run_dir.root / "iter_002" / "learner" / "step_000004"
    learner.step, learner.iteration = 4, 2
    learner.save_checkpoint(str(checkpoint))
    run.manifest.record("iter_002/train/step_000004", tree=checkpoint,
                        checkpoint=str(checkpoint.relative_to(run_dir.root)))
    directory = stages.export_policy(run, learner, 2)
    (directory / "config.json").write_text("{ }")
    learner.step = 7  # whatever the learner holds now, the export is made from the checkpoint
    assert stages.export_policy(new_run(run_dir), learner, 2) == directory
    assert [c[0] for c in learner.calls] == ["save_checkpoint", "export_hf", "load_checkpoint", "export_hf"]
    assert learner.step == 4 and new_run(run_dir).manifest.verify_unit("iter_002/export") is None

    later = new_run(run_dir)  # once the next iteration has trained, the checkpoint is not the export's state
    learner.save_checkpoint(str(run_dir.root / "iter_003" / "learner" / "step_000002"))
    later.manifest.record("iter_003/train/step_000002", tree=run_dir.root / "iter_003" / "learner" / "step_000002",
                          checkpoint="iter_003/learner/step_000002")
    (directory / "config.json").write_text("{ }")
    with pytest.raises(UserError, match="cannot be rebuilt"):
        stages.export_policy(new_run(run_dir), learner, 2)


def test_a_tree_with_no_files_is_never_recorded(run_dir):
    empty = run_dir.root / "iter_001" / "policy"
    empty.mkdir(parents=True)
    with pytest.raises(UserError, match="holds no files.*shared filesystem"):
        new_run(run_dir).manifest.record("iter_001/export", tree=empty)
    assert not new_run(run_dir).manifest.done("iter_001/export")


class Clock:
    """time.perf_counter for the stages, moved on only by the fakes: stage times are then exact."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def test_sync_pushes_the_learners_weights_once_and_records_its_time(run_dir, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(stages, "time", clock)

    class TimedRollout(FakeRollout):
        def sync_from(self, learner):
            super().sync_from(learner)
            clock.now += 1.25  # the broadcast

    learner, engine = FakeLearner(), TimedRollout()
    stages.sync(new_run(run_dir), learner, engine, 1)
    assert engine.synced_from == [learner]
    run = new_run(run_dir)
    assert run.manifest.info("iter_001/sync")["seconds"] == 1.25
    stages.sync(run, learner, engine, 1)
    assert engine.synced_from == [learner]
    assert run.seconds(1, "sync") == 1.25  # what time/sync_s reports


@pytest.mark.parametrize("reference, iteration, expected", [
    ("initial", 1, "initial"), ("initial", 3, "initial"), ("previous", 1, "initial"), ("previous", 3, "iter_002"),
])
def test_reference_policy(run_dir, reference, iteration, expected):
    run = new_run(run_dir, make_config(train={"reference": reference}))
    initial = PolicyConfig(model_path="/models/pi0")
    want = "/models/pi0" if expected == "initial" else str(run_dir.root / expected / "policy")
    assert stages.reference_policy(run, initial, iteration) == want


# ---- evaluation ------------------------------------------------------------------------------------------------------

INITIAL_TEXTS = {0: ["aa", "good bbbb"], 1: ["c", "ddddd"]}
LATER_TEXTS = {0: ["good aaa", "b"], 1: ["cc", "ddddd"]}


def gold(messages, response, meta):
    return float("good" in response) + meta["id"]


def test_evaluate_metrics_rows_and_win_rate_against_the_initial_policy(run_dir):
    cfg = make_config(seed=3, rollout={"top_p": 0.8}, eval={"samples_per_prompt": 2, "temperature": 0.6,
                                                           "max_tokens": 9})
    prompts = [prompt(0), prompt(1)]
    reward, learner = LengthReward(), FakeLearner()
    initial_engine = FakeRollout(lambda index: INITIAL_TEXTS[index])
    initial = stages.evaluate(new_run(run_dir, cfg), initial_engine, reward, learner, prompts, None, gold)

    def flat(texts):
        return [(p.index, t) for p in prompts for t in texts[p.index]]

    base = flat(INITIAL_TEXTS)
    assert initial["eval/reward_mean"] == pytest.approx(statistics.fmean(len(t) for _, t in base))
    assert initial["eval/gold_mean"] == pytest.approx(statistics.fmean(float("good" in t) + i for i, t in base))
    assert "kl/ref" not in initial and "eval/win_rate_vs_initial" not in initial
    assert learner.calls == []
    sampling = Sampling(n=2, temperature=0.6, top_p=0.8, max_tokens=9, seed=derived_seed(3, "eval"))
    assert initial_engine.calls == [([0, 1], sampling)]
    assert [(r["prompt_index"], r["response"], r["reward"], r["gold"]) for r in
            read_jsonl(run_dir.root / "eval_initial.jsonl")] == [
        (i, t, float(len(t)), float("good" in t) + i) for i, t in base]

    engine = FakeRollout(lambda index: LATER_TEXTS[index])
    metrics = stages.evaluate(new_run(run_dir, cfg), engine, reward, learner, prompts, 1, gold)
    later = flat(LATER_TEXTS)
    # the same seed every iteration; at top_p < 1 the KL estimate draws its own samples from the policy itself
    own = Sampling(n=2, temperature=1.0, top_p=1.0, max_tokens=9, seed=derived_seed(derived_seed(3, "eval"), "kl"))
    assert engine.calls == [([0, 1], sampling), ([0, 1], own)]
    assert metrics["eval/reward_mean"] == pytest.approx(statistics.fmean(len(t) for _, t in later))
    assert metrics["eval/response_tokens_mean"] == pytest.approx(statistics.fmean(len(t) for _, t in later))
    wins = [1.0 if len(t) > len(b) else 0.5 if len(t) == len(b) else 0.0 for (_, t), (_, b) in zip(later, base)]
    assert metrics["eval/win_rate_vs_initial"] == pytest.approx(statistics.fmean(wins))
    (call,) = [c for c in learner.calls if c[0] == "log_ratios"]
    assert call[1] == [prompt(i).token_ids for i, _ in later]
    assert call[2] == [list(range(len(t))) for _, t in later]
    ratios = [0.5 * len(t) - 0.1 * len(prompt(i).token_ids) for i, t in later]
    assert metrics["kl/ref"] == pytest.approx(statistics.fmean(ratios))
    assert metrics["kl/ref_stderr"] == pytest.approx(statistics.stdev(ratios) / len(ratios) ** 0.5)
    rows = read_jsonl(run_dir.iteration(1) / "eval.jsonl")
    assert [(r["prompt_index"], r["response"], r["tokens"]) for r in rows] == [(i, t, len(t)) for i, t in later]

    run = new_run(run_dir, cfg)
    assert run.manifest.info("iter_001/eval")["metrics"] == metrics
    assert stages.evaluate(run, engine, reward, learner, prompts, 1, gold) == metrics
    assert len(engine.calls) == 2


class ToyPolicy:
    """One-token responses from a known policy pi: the rollout samples them as vLLM does (temperature, then the
    nucleus of top_p), the learner's log-ratio is the exact log pi(y) - log ref(y)."""

    PI, REF = [0.5, 0.2, 0.15, 0.1, 0.05], [0.2] * 5

    def __init__(self):
        self.calls: list[Sampling] = []

    def generate(self, prompts, sampling):
        self.calls.append(sampling)
        weights = [p ** (1 / sampling.temperature) for p in self.PI]
        order = sorted(range(len(weights)), key=lambda token: -weights[token])
        kept, mass = [], 0.0
        for token in order:  # the smallest set of most likely tokens holding top_p of the mass
            kept.append(token)
            mass += weights[token] / sum(weights)
            if mass >= sampling.top_p - 1e-12:
                break
        rollouts = []
        for p in prompts:
            rng = random.Random(derived_seed(sampling.seed, p.index))
            tokens = rng.choices(kept, [weights[t] for t in kept], k=sampling.n)
            rollouts.append(Rollout(p, [Response(f"t{t}", [t], "stop") for t in tokens]))
        return rollouts

    def log_ratios(self, prompt_token_ids, response_token_ids):
        return [math.log(self.PI[r[0]] / self.REF[r[0]]) for r in response_token_ids]

    @classmethod
    def kl(cls, sampled=None):
        """E_{y~q}[log pi(y) - log ref(y)]; q = pi when `sampled` is None, else {token: probability}."""
        q = sampled or dict(enumerate(cls.PI))
        return sum(q[t] * math.log(cls.PI[t] / cls.REF[t]) for t in q)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.7), (0.5, 1.0), (1.0, 1.0)])
def test_the_kl_estimate_is_unbiased_whatever_the_evaluation_samples_with(run_dir, temperature, top_p):
    cfg = make_config(rollout={"top_p": top_p}, eval={"samples_per_prompt": 40, "temperature": temperature})
    toy, prompts = ToyPolicy(), [prompt(i) for i in range(50)]
    stages.evaluate(new_run(run_dir, cfg), toy, LengthReward(), toy, prompts, None, None)
    metrics = stages.evaluate(new_run(run_dir, cfg), toy, LengthReward(), toy, prompts, 1, None)
    exact = ToyPolicy.kl()  # 0.276 nats; the nucleus of top_p 0.7 (tokens 0, 1) gives 0.654
    assert ToyPolicy.kl({0: 0.5 / 0.7, 1: 0.2 / 0.7}) == pytest.approx(0.654, abs=1e-3)
    # 2,000 samples: standard error 0.707 / sqrt(2000) = 0.016
    assert metrics["kl/ref"] == pytest.approx(exact, abs=0.05)
    spread = math.sqrt(sum(p * math.log(p / r) ** 2 for p, r in zip(ToyPolicy.PI, ToyPolicy.REF)) - exact ** 2)
    assert metrics["kl/ref_stderr"] == pytest.approx(spread / math.sqrt(2000), rel=0.1)
    evaluation = Sampling(n=40, temperature=temperature, top_p=top_p, max_tokens=cfg.eval.max_tokens,
                          seed=derived_seed(cfg.seed, "eval"))
    drawn_for_kl = [] if (temperature, top_p) == (1.0, 1.0) else [
        dataclasses.replace(evaluation, temperature=1.0, top_p=1.0, seed=derived_seed(evaluation.seed, "kl"))]
    assert toy.calls == [evaluation, evaluation, *drawn_for_kl]  # the on-policy case reuses the evaluation's


def test_a_damaged_evaluation_is_redone(run_dir):
    engine = FakeRollout(lambda index: INITIAL_TEXTS[index])
    first = stages.evaluate(new_run(run_dir), engine, LengthReward(), FakeLearner(), [prompt(0)], None, None)
    (run_dir.root / "eval_initial.jsonl").write_text("")
    again = stages.evaluate(new_run(run_dir), engine, LengthReward(), FakeLearner(), [prompt(0)], None, None)
    assert again == first and len(engine.calls) == 2
    assert len(read_jsonl(run_dir.root / "eval_initial.jsonl")) == len(INITIAL_TEXTS[0])


def test_evaluate_without_gold_has_no_gold_metric_or_column(run_dir):
    engine = FakeRollout(lambda index: INITIAL_TEXTS[index])
    metrics = stages.evaluate(new_run(run_dir), engine, LengthReward(), FakeLearner(), [prompt(0)], None, None)
    assert "eval/gold_mean" not in metrics
    assert all("gold" not in row for row in read_jsonl(run_dir.root / "eval_initial.jsonl"))


# ---- metrics ---------------------------------------------------------------------------------------------------------

def test_finish_iteration_sums_stage_times_from_the_manifest(run_dir):
    run = new_run(run_dir)
    seconds = {"iter_001/rollouts/shard_00000": 1.5, "iter_001/rollouts/shard_00001": 2.0,
               "iter_001/scores/shard_00000": 0.5, "iter_001/train/step_000004": 3.0,
               "iter_001/train/step_000008": 1.25, "iter_001/sync": 0.25, "iter_001/eval": 1.0,
               "iter_001/pairs_dataset": 0.125, "iter_002/rollouts/shard_00000": 100.0, "eval_initial": 50.0}
    for unit, value in seconds.items():
        run.manifest.record(unit, seconds=value)
    run.manifest.record("iter_001/pairs", count=3)

    metrics = stages.finish_iteration(run, 1, {"reward/mean": 0.5})

    def of(stage):
        return sum(v for u, v in seconds.items() if u.startswith(f"iter_001/{stage}/") or u == f"iter_001/{stage}")

    expected = {"iteration": 1, "reward/mean": 0.5, "time/generate_s": of("rollouts"), "time/score_s": of("scores"),
                "time/train_s": of("train"), "time/sync_s": of("sync"), "time/eval_s": of("eval"),
                "time/iteration_s": sum(v for u, v in seconds.items() if u.startswith("iter_001/"))}
    assert metrics == pytest.approx(expected)
    assert json.loads((run_dir.iteration(1) / "metrics.json").read_text()) == pytest.approx(expected)
    assert new_run(run_dir).manifest.info("iter_001/done")["files"][0]["path"] == "iter_001/metrics.json"


class FixedReward:
    def __init__(self, scores):
        self.scores = scores

    def score(self, queries):
        return [RewardResult(scores=list(self.scores)) for _ in queries]


def rollout_of_lengths(token_counts):
    responses = [Response(text=f"r{i}", token_ids=[7] * n, finish_reason="stop") for i, n in enumerate(token_counts)]
    return Rollout(Prompt(0, [{"role": "user", "content": "q"}], [1, 2]), responses)


def test_length_penalty_is_applied_once_and_the_raw_scores_are_kept():
    [scored] = stages.score_rollouts(FixedReward([1.0, 1.0, 2.0]), [rollout_of_lengths([10, 40, 100])],
                                     length_penalty=0.01)
    assert scored.scores == pytest.approx([0.9, 0.6, 1.0])
    assert scored.raw_scores == [1.0, 1.0, 2.0]
    assert records.scored_from_json(records.to_json(scored)) == scored


def test_no_penalty_leaves_the_scores_as_the_model_gave_them():
    [scored] = stages.score_rollouts(FixedReward([0.3, -0.2]), [rollout_of_lengths([5, 6])], length_penalty=0.0)
    assert scored.scores == scored.raw_scores == [0.3, -0.2]
    old = records.to_json(scored)
    del old["raw_scores"]  # a scores file written before raw scores were recorded
    assert records.scored_from_json(old).raw_scores == [0.3, -0.2]


def test_episodes_go_to_the_reward_model_with_their_turns_and_round_trip_through_json():
    from reward.config import RewardConfig
    from reward.registry import build_reward_model

    prompt = Prompt(0, [{"role": "user", "content": "q"}], [1, 2], {})
    episodes = [records.Episode([{"role": "assistant", "content": "a"}], [1, 1], 1, "done", 0.25),
                records.Episode([{"role": "assistant", "content": "b"}, {"role": "user", "content": "again"},
                                 {"role": "assistant", "content": "c"}], [1, 0, 1], 2, "max_turns", None)]
    rollout = Rollout(prompt, [Response("a", [5, 6], "stop", episodes[0]), Response("c", [5, 9, 7], "length",
                                                                                      episodes[1])])
    [scored] = stages.score_rollouts(build_reward_model(RewardConfig(kind="outcome", missing_outcome=-1.0), "cpu"),
                                     [rollout], length_penalty=0.0)
    assert scored.scores == [0.25, -1.0]
    assert records.scored_from_json(json.loads(json.dumps(records.to_json(scored)))) == scored
    assert rollout.responses[1].loss_mask == [1, 0, 1] and Response("x", [1], "stop").loss_mask is None
