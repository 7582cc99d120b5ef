"""The bundled environment end to end, as a user runs it: `rlhf-loop run configs/toy_episodes.yaml`, shortened, on the
toy task's models (built once into .cache/toy_task, as `make demo` does). Episodes are sampled, scored by their
outcome, paired and trained on; a run killed while an episode shard is in flight resumes to the same pairs,
evaluations, metrics and weights as the uninterrupted run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_loop.common.files import read_jsonl
from tests.cli_runs import rlhf_loop

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHORT = ("iterations=2", "data.prompts_per_iteration=16", "rollout.samples_per_prompt=4", "rollout.shard_size=4",
         "reward.shard_size=4", "eval.num_prompts=8", "eval.samples_per_prompt=1", "train.micro_batch_size=4",
         "train.save_steps=2", f"toy_task.dir={REPO / '.cache' / 'toy_task'}", "cluster.num_cpus=2")


def finished(run_dir: Path) -> dict:
    iterations = sorted(run_dir.glob("iter_*"))
    return {
        "pairs": [read_jsonl(d / "pairs.jsonl") for d in iterations],
        "eval": [read_jsonl(d / "eval.jsonl") for d in iterations],
        "metrics": [{k: v for k, v in m.items() if not k.startswith("time/")}
                    for m in read_jsonl(run_dir / "metrics.jsonl")],
        "weights": load_file(iterations[-1] / "policy" / "model.safetensors"),
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("episodes") / "uninterrupted"
    result = rlhf_loop("run", str(REPO / "configs" / "toy_episodes.yaml"), *SHORT, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:]
    return run_dir


def test_the_bundled_environment_runs_episodes_scores_pairs_and_trains_on_them(uninterrupted):
    metrics = read_jsonl(uninterrupted / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 1.0 <= m["episodes/turns_mean"] <= 3.0 and 0.0 <= m["episodes/outcome_mean"] <= 1.0
        assert m["episodes/outcome_given_fraction"] == 1.0  # the environment gives an outcome at every step
        assert sum(m[f"episodes/end_{end}_fraction"] for end in ("done", "max_turns", "max_tokens", "turn_cut")) == 1
        assert "eval/outcome_mean" in m and "eval/gold_mean" in m and m["kl/ref"] == m["kl/ref"]
    rollouts = [r for shard in sorted((uninterrupted / "iter_001" / "rollouts").glob("*.jsonl"))
                for r in read_jsonl(shard)]
    assert len(rollouts) == 16 and all(len(r["responses"]) == 4 for r in rollouts)
    episodes = [response["episode"] for r in rollouts for response in r["responses"]]
    assert max(e["turns"] for e in episodes) > 1  # some answers were imperfect and asked again
    multi = next(r for r in rollouts for response in r["responses"] if response["episode"]["turns"] > 1)
    response = next(response for response in multi["responses"] if response["episode"]["turns"] > 1)
    assert 0 in response["episode"]["loss_mask"] and len(response["episode"]["loss_mask"]) == len(response["token_ids"])
    pairs = read_jsonl(uninterrupted / "iter_001" / "pairs.jsonl")
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert all(p["chosen"]["episode"]["outcome"] == p["chosen_score"] for p in pairs)  # reward kind outcome
    assert (uninterrupted / "iter_002" / "policy" / "model.safetensors").is_file()


@pytest.mark.timeout(1200)  # three runs
def test_killed_while_an_episode_shard_is_in_flight_then_resumed_equals_uninterrupted(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    # Outcome scoring takes no time: scoring shard 0 is recorded as the engines start episode shard 1.
    result = rlhf_loop("run", str(REPO / "configs" / "toy_episodes.yaml"), *SHORT, "--run-dir", str(run_dir),
                       kill_at="iter_001/scores/shard_00000")
    assert result.returncode == -signal.SIGKILL, result.stdout[-3000:]
    units = json.loads((run_dir / "manifest.json").read_text())["units"]
    assert "iter_001/rollouts/shard_00000" in units and "iter_001/rollouts/shard_00001" not in units
    result = rlhf_loop("resume", str(run_dir), kill_at="iter_002/rollouts/shard_00002:before")
    assert result.returncode == -signal.SIGKILL, result.stdout[-3000:]
    result = rlhf_loop("resume", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:]

    expected, actual = finished(uninterrupted), finished(run_dir)
    assert actual["pairs"] == expected["pairs"]
    assert actual["eval"] == expected["eval"]
    assert actual["metrics"] == expected["metrics"]
    assert all(actual["weights"][k].equal(expected["weights"][k]) for k in expected["weights"])


def test_a_rollout_actor_killed_between_two_turns_redoes_its_episodes_within_the_run(uninterrupted, tmp_path):
    markers, run_dir = tmp_path / "killed_once", tmp_path / "actor"
    result = rlhf_loop("run", str(REPO / "configs" / "toy_episodes.yaml"), *SHORT, "iterations=1",
                       "--run-dir", str(run_dir), kill_actors=f"episodes:{markers}")
    assert result.returncode == 0, result.stdout[-3000:]
    assert (markers / "episodes").exists() and "rollout engine 0 died during generate" in result.stdout
    assert read_jsonl(run_dir / "eval_initial.jsonl") == read_jsonl(uninterrupted / "eval_initial.jsonl")
    assert read_jsonl(run_dir / "iter_001" / "pairs.jsonl") == read_jsonl(uninterrupted / "iter_001" / "pairs.jsonl")


def test_the_hf_engine_runs_episodes_too(tmp_path):
    run_dir = tmp_path / "hf"
    result = rlhf_loop("run", str(REPO / "configs" / "toy_episodes.yaml"), *SHORT, "iterations=1", "rollout.engine=hf",
                       "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:]
    (metrics,) = read_jsonl(run_dir / "metrics.jsonl")
    assert metrics["episodes/turns_mean"] > 1.0 and metrics["pairs/count"] > 0
