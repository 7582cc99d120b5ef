import json
import struct
import sys
import time
import types

import pytest

from rlhf_loop.config import WandbConfig
from rlhf_loop.driver.metrics import (Tracker, episode_metrics, pair_metrics, reward_metrics, step_curves, summary_line,
                                     wandb_run_id)
from rlhf_loop.driver.pairs import select_pairs
from rlhf_loop.common.records import Episode, Prompt, Response, Rollout, Scored
from rlhf_loop.rundir.manifest import Manifest, RunDir
from rlhf_loop.common.files import atomic_write_json, atomic_write_text


def scored(index, scores, objectives=None):
    prompt = Prompt(index=index, messages=[{"role": "user", "content": "q"}], token_ids=[1])
    responses = [Response(text=f"r{k}", token_ids=[k] * (k + 1), finish_reason="stop" if k else "length")
                 for k in range(len(scores))]
    return Scored(Rollout(prompt, responses), scores, objectives or {})


def test_reward_metrics_match_a_hand_computation():
    items = [scored(0, [1.0, 3.0], {"helpful": [0.0, 2.0]}), scored(1, [2.0, 6.0], {"helpful": [4.0, 6.0]})]
    pairs = select_pairs(items, "max_min", 0.0, seed=0).pairs
    metrics = reward_metrics(items, pairs)
    assert metrics["reward/mean"] == pytest.approx(3.0)
    assert metrics["reward/std"] == pytest.approx((sum((x - 3) ** 2 for x in (1, 3, 2, 6)) / 4) ** 0.5)
    assert metrics["reward/chosen_mean"] == pytest.approx(4.5) and metrics["reward/rejected_mean"] == pytest.approx(1.5)
    assert metrics["reward/helpful_mean"] == pytest.approx(3.0)
    assert metrics["rollout/response_tokens_mean"] == pytest.approx(1.5)
    assert metrics["rollout/truncated_fraction"] == pytest.approx(0.5)


def test_raw_scores_are_reported_only_when_a_length_penalty_changed_them():
    plain = [scored(0, [1.0, 3.0])]
    assert "reward/raw_mean" not in reward_metrics(plain, [])
    penalised = [Scored(plain[0].rollout, [0.9, 2.8], {}, [1.0, 3.0])]
    metrics = reward_metrics(penalised, [])
    assert metrics["reward/mean"] == pytest.approx(1.85) and metrics["reward/raw_mean"] == pytest.approx(2.0)


def test_pair_metrics_count_flat_prompts_beside_dropped_pairs():
    items = [scored(0, [1.0, 1.0, 1.0]), scored(1, [0.0, 2.0, 1.0])]
    metrics = pair_metrics(select_pairs(items, "max_min", 0.0, seed=0, per_prompt=2))
    assert metrics["pairs/count"] == 2 and metrics["pairs/dropped_tie"] == 2 and metrics["pairs/flat_prompts"] == 1


def test_pair_metrics_count_the_pairs_the_learner_s_lengths_cut():
    from types import SimpleNamespace

    items = [scored(0, [0.0, 2.0, 1.0, 3.0])]  # responses of 1, 2, 3 and 4 tokens after a 1-token prompt
    selection = select_pairs(items, "max_min", 0.0, seed=0)
    assert "pairs/truncated_response" not in pair_metrics(selection)  # no learner: nothing is cut
    cut = pair_metrics(selection, SimpleNamespace(max_prompt_length=1, max_length=4))
    fits = pair_metrics(selection, SimpleNamespace(max_prompt_length=1, max_length=5))
    assert (cut["pairs/truncated_prompt"], cut["pairs/truncated_response"]) == (0, 1)
    assert (fits["pairs/truncated_prompt"], fits["pairs/truncated_response"]) == (0, 0)


def test_tracker_writes_metrics_jsonl_and_an_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    tracker = Tracker(run_dir, WandbConfig(mode="offline", project="test"), {"seed": 0})
    for iteration in (1, 2):
        metrics = {"iteration": iteration, "reward/mean": 0.5 * iteration}
        atomic_write_json(run_dir.iteration(iteration) / "metrics.json", metrics)
        tracker.log(iteration, metrics)
    tracker.close()
    lines = [json.loads(line) for line in run_dir.metrics_path.read_text().splitlines()]
    assert [m["reward/mean"] for m in lines] == [0.5, 1.0]
    assert list((run_dir.root / "wandb").glob("offline-run-*")), "no offline wandb run was written"


def test_metrics_jsonl_lists_iterations_by_number_past_999(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    tracker = Tracker(run_dir, WandbConfig(mode="disabled"), {})
    for iteration in (998, 999, 1000, 1001):
        metrics = {"iteration": iteration, "reward/mean": 0.5}
        atomic_write_json(run_dir.iteration(iteration) / "metrics.json", metrics)
        tracker.log(iteration, metrics)
    tracker.close()
    lines = [json.loads(line) for line in run_dir.metrics_path.read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [998, 999, 1000, 1001]


def test_disabled_wandb_writes_nothing_of_wandb(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    tracker = Tracker(run_dir, WandbConfig(mode="disabled"), {})
    tracker.close()
    assert not (run_dir.root / "wandb").exists()


def test_overwrite_starts_a_new_wandb_run_and_resume_keeps_it(tmp_path, monkeypatch):
    inits = []
    fake_wandb = types.SimpleNamespace(init=lambda **kwargs: inits.append(kwargs) or types.SimpleNamespace(
        finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)

    def start(run_dir):
        Tracker(run_dir, WandbConfig(mode="offline", project="test"), {}).close()
        return inits[-1]["id"]

    root = tmp_path / "run"
    run_dir = RunDir.create(root, overwrite=False)
    atomic_write_text(run_dir.config_path, "iterations: 1\n")
    first = start(run_dir)
    assert start(RunDir.existing(root)) == first  # resume: the same wandb run
    assert inits[-1]["resume"] == "allow"
    overwritten = RunDir.create(root, overwrite=True)
    atomic_write_text(overwritten.config_path, "iterations: 1\n")
    second = start(overwritten)
    assert second != first and start(RunDir.existing(root)) == second


def test_a_run_from_before_run_ids_keeps_its_path_derived_wandb_id(tmp_path):
    old, other = RunDir(tmp_path / "old"), RunDir(tmp_path / "other")
    for run_dir in (old, other):
        atomic_write_json(run_dir.manifest_path, {"version": 1, "units": {}})
    assert len(wandb_run_id(old)) == 16 and wandb_run_id(RunDir(tmp_path / "old")) == wandb_run_id(old)
    assert wandb_run_id(other) != wandb_run_id(old)


# ---- the console line, the step curves, wandb's axes and project -----------------------------------------------------

ONLINE_METRICS = {"iteration": 2, "reward/mean": 0.2934, "eval/gold_mean": 0.6666, "kl/ref": 0.95,
                  "pairs/count": 498, "prompts/count": 512, "time/iteration_s": 42.14, "dpo/loss": 0.6}


def test_summary_line_of_an_online_iteration():
    previous = {"iteration": 1, "reward/mean": -0.9566}
    assert summary_line(ONLINE_METRICS, 3, previous) == \
        "iter 2/3  reward 0.293 (+1.25)  gold 0.667  kl 0.95  pairs 498/512  42.1 s"
    assert summary_line(ONLINE_METRICS, 3, None).startswith("iter 2/3  reward 0.293  gold")  # nothing to compare


def test_summary_line_leaves_out_what_a_run_does_not_measure():
    offline = {"iteration": 1, "dpo/loss": 0.52, "pairs/count": 1000, "time/iteration_s": 12.0}
    assert summary_line(offline, 1, None) == "iter 1/1  loss 0.52  pairs 1000  12.0 s"


def train_chunks(manifest, chunks):
    for iteration, step, loss in chunks:
        manifest.record(f"iter_{iteration:03d}/train/step_{step:06d}", steps=4, loss=loss, reward_accuracy=0.5,
                        margin=0.25, chosen_reward=0.1, rejected_reward=-0.15, learning_rate=1e-4, seconds=3.0)


def test_step_curves_count_steps_over_the_whole_run(tmp_path):
    manifest = Manifest.load(RunDir.create(tmp_path / "run", overwrite=False))
    train_chunks(manifest, [(1, 4, 0.7), (1, 8, 0.6), (2, 4, 0.5), (2, 6, 0.4), (3, 4, 0.3)])
    manifest.record("iter_002/export")
    rows = step_curves(manifest.units, 2)
    assert [row["train/step"] for row in rows] == [12, 14]  # iteration 1 took 8 steps
    assert [row["train/loss"] for row in rows] == [0.5, 0.4]
    assert set(rows[0]) == {"train/step", "train/loss", "train/reward_accuracy", "train/margin", "train/chosen_reward",
                            "train/rejected_reward", "train/learning_rate"}
    assert [row["train/step"] for row in step_curves(manifest.units, 3)] == [18]
    assert step_curves(manifest.units, 4) == []


def wandb_records(path):
    """The protobuf records of a .wandb file: a 7-byte header, then 32 KiB blocks of (crc32, length, type) chunks;
    type 1 is a whole record, 2-4 its first, middle and last parts."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 or position + 7 + length > len(data):  # the end, or a record still being written
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_wandb_records(path, timeout_s=30.0):
    """The records once the run's exit is among them: wandb's service process writes the file, and `finish()` can
    return before it has."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_offline_wandb_gets_step_curves_and_iteration_metrics_on_their_own_axes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    train_chunks(Manifest.load(run_dir), [(1, 4, 0.7), (1, 8, 0.6), (2, 4, 0.5)])
    tracker = Tracker(run_dir, WandbConfig(mode="offline", project="test"), {"iterations": 2})
    for iteration in (1, 2):
        metrics = {"iteration": iteration, "reward/mean": 0.5 * iteration, "dpo/loss": 0.6}
        atomic_write_json(run_dir.iteration(iteration) / "metrics.json", metrics)
        tracker.log(iteration, metrics)
    tracker.close()
    (path,) = (run_dir.root / "wandb").glob("offline-run-*/run-*.wandb")
    history, axes = [], {}
    for record in finished_wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            history.append({key: json.loads(value) for key, value in items.items() if not key.startswith("_")})
        elif record.WhichOneof("record_type") == "metric":
            axes[record.metric.name or record.metric.glob_name] = record.metric.step_metric
    assert [(row.get("train/step"), row.get("train/loss"), row.get("iteration")) for row in history] == [
        (4, 0.7, None), (8, 0.6, None), (None, None, 1), (12, 0.5, None), (None, None, 2)]
    assert axes["train/*"] == "train/step" and axes["reward/mean"] == axes["dpo/loss"] == "iteration"


@pytest.mark.parametrize("configured, environment, expected", [
    ({}, {}, ("rlhf-loop", None)),
    ({}, {"WANDB_PROJECT": "env-project", "WANDB_ENTITY": "env-team"}, ("env-project", "env-team")),
    ({"project": "mine", "entity": "my-team"}, {"WANDB_PROJECT": "env-project", "WANDB_ENTITY": "env-team"},
     ("mine", "my-team")),
], ids=["default", "environment", "config_wins"])
def test_wandb_project_and_entity_from_config_then_environment(tmp_path, monkeypatch, configured, environment,
                                                               expected):
    inits = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=lambda **kwargs: inits.append(kwargs) or types.SimpleNamespace(finish=lambda: None)))
    for key in ("WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    Tracker(run_dir, WandbConfig(mode="offline", **configured), {}).close()
    assert (inits[0]["project"], inits[0]["entity"]) == expected


def test_episode_metrics_count_turns_endings_and_outcomes():
    episodes = [Episode([], [1, 1, 0, 1], 2, "done", 1.0), Episode([], [1, 1], 1, "done", 0.5),
                Episode([], [1, 0, 1, 0, 1], 3, "max_turns", None), Episode([], [1], 1, "turn_cut", 0.0)]
    metrics = episode_metrics(episodes, "episodes")
    assert metrics["episodes/turns_mean"] == 7 / 4
    assert metrics["episodes/policy_tokens_mean"] == 9 / 4
    assert metrics["episodes/outcome_mean"] == 0.5 and metrics["episodes/outcome_given_fraction"] == 3 / 4
    assert metrics["episodes/end_done_fraction"] == 0.5 and metrics["episodes/end_max_turns_fraction"] == 0.25
    assert metrics["episodes/end_max_tokens_fraction"] == 0.0 and metrics["episodes/end_turn_cut_fraction"] == 0.25
    assert episode_metrics([], "episodes") == {}
    line = summary_line({"iteration": 1, "reward/mean": 0.5, **metrics}, 2, None)
    assert "turns 1.75" in line and "outcome 0.5" in line
