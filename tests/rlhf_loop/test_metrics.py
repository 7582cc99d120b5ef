import json

import pytest

from rlhf_loop.config import WandbConfig
from rlhf_loop.metrics import Tracker, pair_metrics, reward_metrics
from rlhf_loop.pairs import select_pairs
from rlhf_loop.records import Prompt, Response, Rollout, Scored
from rlhf_loop.rundir import RunDir, atomic_write_json


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


def test_disabled_wandb_writes_nothing_of_wandb(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", overwrite=False)
    tracker = Tracker(run_dir, WandbConfig(mode="disabled"), {})
    tracker.close()
    assert not (run_dir.root / "wandb").exists()
