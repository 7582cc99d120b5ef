"""The whole loop, end to end, as a user runs it: `rlhf-loop run` in a subprocess, on tiny local models.

Also the crash tests: the run is SIGKILLed inside every stage (a manifest write and a checkpoint write included) and
resumed, and must end with exactly the pairs, metrics and weights of an uninterrupted run, having recorded no unit
twice; and actors killed mid-run are restarted within the run, with the same results.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_loop.common.files import read_jsonl
from tests.cli_runs import rlhf_loop

pytestmark = pytest.mark.integration

REQUIRED_METRICS = {
    "iteration", "reward/mean", "reward/std", "reward/chosen_mean", "reward/rejected_mean", "pairs/count",
    "pairs/dropped", "dpo/loss", "dpo/reward_accuracy", "dpo/margin", "kl/ref", "time/generate_s", "time/score_s",
    "time/train_s", "time/sync_s", "time/iteration_s", "eval/reward_mean", "eval/response_tokens_mean",
    "eval/win_rate_vs_initial",
}


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_policy_dir, tiny_reward_dir):
    directory = tmp_path_factory.mktemp("loop")
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name {i} fruits, please."}) + "\n" for i in range(60)))
    held_out = directory / "eval_prompts.jsonl"  # never trained on
    held_out.write_text("".join(json.dumps({"prompt": f"Name {i} animals, please."}) + "\n" for i in range(6)))
    conversations = directory / "sft.jsonl"
    conversations.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Name {i} fruits, please."},
        {"role": "assistant", "content": "apples, bananas and cherries"}]}) + "\n" for i in range(24)))
    path = directory / "loop.yaml"
    path.write_text(f"""
iterations: 3
policy: {{model_path: {tiny_policy_dir}}}
data: {{prompts: [{prompts}], prompts_per_iteration: 12, max_prompt_tokens: 64}}
rollout: {{samples_per_prompt: 4, max_tokens: 12, shard_size: 5}}
reward: {{model_path: {tiny_reward_dir}, shard_size: 5}}
train: {{learning_rate: 2.0e-3, micro_batch_size: 2, gradient_accumulation_steps: 2, save_steps: 2,
        max_length: 96, max_prompt_length: 64}}
sft: {{enabled: true, dataset: {conversations}, micro_batch_size: 4, save_steps: 2, learning_rate: 1.0e-3,
      max_length: 96, max_prompt_length: 64}}
eval: {{prompts: {held_out}, num_prompts: 6, samples_per_prompt: 2}}
cluster: {{num_cpus: 2}}
""")
    return path


def finished(run_dir: Path) -> dict:
    """Everything that must not change when a run is interrupted and resumed."""
    iterations = sorted(run_dir.glob("iter_*"))
    return {
        "pairs": [read_jsonl(d / "pairs.jsonl") for d in iterations],
        "metrics": [{k: v for k, v in m.items() if not k.startswith("time/")} for m in read_jsonl(run_dir / "metrics.jsonl")],
        "eval": [read_jsonl(d / "eval.jsonl") for d in iterations],
        "sft_weights": load_file(run_dir / "sft" / "policy" / "model.safetensors"),
        "weights": load_file(iterations[-1] / "policy" / "model.safetensors"),
    }


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    result = rlhf_loop("run", str(config), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:]
    return run_dir


def test_three_iterations_with_vllm(uninterrupted):
    metrics = read_jsonl(uninterrupted / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert REQUIRED_METRICS <= m.keys(), REQUIRED_METRICS - m.keys()
        assert m["pairs/count"] + m["pairs/dropped"] == m["prompts/count"] == 12
    assert (uninterrupted / "sft" / "policy" / "model.safetensors").is_file()  # the warm start ran first
    placement = json.loads((uninterrupted / "placement.json").read_text())
    assert set(placement) == {"rollout", "reward", "learner"}  # started at once; each says where and how long
    assert all(info["startup_s"] > 0 and info["actors"][0]["node_id"] for info in placement.values())
    assert not (uninterrupted / "sft" / "learner").exists()  # its checkpoints are gone once it is exported
    for i in (1, 2, 3):
        iteration = uninterrupted / f"iter_{i:03d}"
        assert len(list((iteration / "rollouts").glob("shard_*.jsonl"))) == 3  # 12 prompts in shards of 5
        rollouts = [r for shard in sorted((iteration / "rollouts").glob("*.jsonl")) for r in read_jsonl(shard)]
        assert len(rollouts) == 12 and all(len(r["responses"]) == 4 for r in rollouts)
        evaluation = read_jsonl(iteration / "eval.jsonl")  # 6 held-out prompts x 2 samples, in prompt order
        assert [row["prompt_index"] for row in evaluation] == [i // 2 for i in range(12)]
        assert (iteration / "policy" / "model.safetensors").is_file()
        assert (iteration / "policy" / "tokenizer_config.json").is_file()
    # the policy moved: every iteration trained and the exports differ
    first = load_file(uninterrupted / "iter_001" / "policy" / "model.safetensors")
    last = load_file(uninterrupted / "iter_003" / "policy" / "model.safetensors")
    assert any(not first[k].equal(last[k]) for k in first)


def test_status_reports_a_finished_run(uninterrupted):
    result = rlhf_loop("status", str(uninterrupted), "--json")
    status = json.loads(result.stdout)
    assert status["finished"] and status["iterations_done"] == 3
    assert status["last_metrics"]["iteration"] == 3


def test_three_iterations_with_hf_engine(config, tmp_path):
    run_dir = tmp_path / "hf"
    result = rlhf_loop("run", str(config), "rollout.engine=hf", "iterations=2", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert all(REQUIRED_METRICS <= m.keys() for m in metrics)


# Kill points inside every stage, in the order a run reaches them: after a unit is recorded, with its files written
# but not recorded (":before"), between the manifest's two writes (":manifest"), and a learner rank dying in the
# middle of writing a checkpoint ("checkpoint:"; the run then stops with one line instead of a SIGKILL). Scoring shard
# k runs beside generation shard k+1, so either may be recorded first: a scoring kill point follows a generation one
# only when it cannot have been reached yet (shard 2 is scored after generation shard 2, which follows shard 1).
KILL_POINTS = [
    "sft/step_000002",
    "sft/done:before",
    "eval_initial:before",
    "iter_001/rollouts/shard_00001",
    "iter_001/scores/shard_00002:before",
    "iter_001/pairs:manifest",
    "iter_001/pairs",
    "iter_001/train/step_000002",
    "iter_001/export:before",
    "iter_001/sync",
    "iter_001/eval",
    "iter_002/rollouts/shard_00002:before",
    "checkpoint:iter_002/step_000002",
    "iter_002/train/step_000002:before",
    "iter_002/done:before",
    "iter_003/scores/shard_00001",
]


@pytest.mark.timeout(2400)  # 17 processes, each starting Ray, vLLM and DeepSpeed: about 10 minutes here
def test_sigkill_in_every_stage_then_resume_equals_uninterrupted(config, uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    for number, point in enumerate(KILL_POINTS):
        command = ("run", str(config), "--run-dir", str(run_dir)) if number == 0 else ("resume", str(run_dir))
        result = rlhf_loop(*command, kill_at=point)
        if point.startswith("checkpoint:"):
            assert result.returncode == 2, f"not stopped at {point}: {result.stdout[-3000:]}"
            assert "the learner rank 0 died during checkpoint" in result.stdout, result.stdout[-3000:]
        else:
            assert result.returncode == -signal.SIGKILL, f"not killed at {point}: {result.stdout[-3000:]}"
    result = rlhf_loop("resume", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:]

    # No finished unit was done twice: each was recorded once, by one of the processes.
    recorded = Counter(line["unit"] for line in read_jsonl(run_dir / "journal.jsonl"))
    assert max(recorded.values()) == 1, [unit for unit, count in recorded.items() if count > 1]
    assert set(recorded) == set(json.loads((run_dir / "manifest.json").read_text())["units"])

    expected, actual = finished(uninterrupted), finished(run_dir)
    assert actual["pairs"] == expected["pairs"]
    assert actual["metrics"] == expected["metrics"]
    assert actual["eval"] == expected["eval"]
    for weights in ("sft_weights", "weights"):
        assert actual[weights].keys() == expected[weights].keys()
        assert all(actual[weights][k].equal(expected[weights][k]) for k in expected[weights])


def test_best_of_n_data_building_then_offline_dpo_on_it(config, tmp_path):
    """The Magpie recipe's shape (sample, score, export pairs; no training), then the MagpieLM recipe's (offline DPO
    on a preference dataset; nothing sampled)."""
    import datasets

    build = tmp_path / "best_of_n"
    result = rlhf_loop("run", str(config), "iterations=1", "train.enabled=false", "pairs.export_format=parquet",
                       "pairs.export_test_fraction=0.25", "sft.enabled=false", "--run-dir", str(build))
    assert result.returncode == 0, result.stdout[-3000:]
    assert not (build / "iter_001" / "policy").exists()  # nothing trained
    pairs = read_jsonl(build / "iter_001" / "pairs.jsonl")
    exported = datasets.load_dataset("parquet", data_dir=str(build / "iter_001" / "pairs_dataset"))
    assert exported["train"].num_rows + exported["test"].num_rows == len(pairs) > 0
    assert exported["test"].num_rows == -(-len(pairs) // 4)
    assert {"prompt", "chosen", "rejected"} <= set(exported["train"].column_names)

    offline = tmp_path / "offline"
    result = rlhf_loop("run", str(config), "iterations=1", "sft.enabled=false", "data.prompts=[]",
                       f"pairs.dataset={build / 'iter_001' / 'pairs_dataset' / 'train.parquet'}",
                       "--run-dir", str(offline))
    assert result.returncode == 0, result.stdout[-3000:]
    (metrics,) = read_jsonl(offline / "metrics.jsonl")
    assert metrics["pairs/count"] == exported["train"].num_rows and metrics["dpo/loss"] > 0
    assert not (offline / "iter_001" / "rollouts").exists()  # nothing sampled
    assert (offline / "iter_001" / "policy" / "model.safetensors").is_file()
    # the offline pairs are the exported ones
    trained = read_jsonl(offline / "iter_001" / "pairs.jsonl")
    built = {(p["chosen"]["text"].strip(), p["rejected"]["text"].strip()) for p in pairs}
    assert all((p["chosen"]["text"].strip(), p["rejected"]["text"].strip()) in built for p in trained)


def test_killed_rollout_and_reward_actors_are_restarted_within_the_run(config, uninterrupted, tmp_path):
    markers = tmp_path / "killed_once"
    run_dir = tmp_path / "actors"
    result = rlhf_loop("run", str(config), "iterations=1", "--run-dir", str(run_dir),
                       kill_actors=f"rollout,reward:{markers}")
    assert result.returncode == 0, result.stdout[-3000:]
    assert (markers / "rollout").exists() and (markers / "reward").exists()  # each was killed once
    assert "rollout engine 0 died during generate; restarted it" in result.stdout
    assert "the reward actor died while scoring; restarted it" in result.stdout
    expected, actual = uninterrupted / "iter_001", run_dir / "iter_001"
    assert read_jsonl(actual / "pairs.jsonl") == read_jsonl(expected / "pairs.jsonl")
    assert read_jsonl(actual / "eval.jsonl") == read_jsonl(expected / "eval.jsonl")
    weights, expected_weights = load_file(actual / "policy" / "model.safetensors"), load_file(
        expected / "policy" / "model.safetensors")
    assert all(weights[k].equal(expected_weights[k]) for k in expected_weights)


# rollout.max_staleness 1: iteration i+1 samples (from the weights synced after i-1) while the learner trains i.
# Killed while iteration 2 samples beside iteration 1's training, and while iteration 3 samples beside iteration 2's
# (the resumed learner is then past version 1, so the engines get iteration 1's export).
STALE_KILL_POINTS = ["iter_002/rollouts/shard_00001", "iter_002/train/step_000002"]


@pytest.mark.timeout(1200)  # four runs
def test_one_update_behind_sigkilled_then_resumed_equals_uninterrupted(config, tmp_path):
    stale = ("rollout.max_staleness=1",)
    uninterrupted = tmp_path / "stale"
    result = rlhf_loop("run", str(config), *stale, "--run-dir", str(uninterrupted))
    assert result.returncode == 0, result.stdout[-3000:]
    versions = [{pair["policy_version"] for pair in read_jsonl(uninterrupted / f"iter_{i:03d}" / "pairs.jsonl")}
                for i in (1, 2, 3)]
    assert versions == [{0}, {0}, {1}]  # iteration 3 sampled from iteration 1's weights, one update behind
    units = json.loads((uninterrupted / "manifest.json").read_text())["units"]
    assert units["iter_003/rollouts/shard_00000"]["policy_version"] == 1

    killed_and_resumed_equals(config, stale, STALE_KILL_POINTS, tmp_path / "killed", uninterrupted)


def killed_and_resumed_equals(config, overrides, kill_points, run_dir, uninterrupted):
    """The run SIGKILLed at each point in turn, then resumed to the end, recorded no unit twice and ended with the
    uninterrupted run's pairs, metrics, evaluations and weights."""
    for number, point in enumerate(kill_points):
        command = (("run", str(config), *overrides, "--run-dir", str(run_dir)) if number == 0
                   else ("resume", str(run_dir)))
        result = rlhf_loop(*command, kill_at=point)
        assert result.returncode == -signal.SIGKILL, f"not killed at {point}: {result.stdout[-3000:]}"
    result = rlhf_loop("resume", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:]

    recorded = Counter(line["unit"] for line in read_jsonl(run_dir / "journal.jsonl"))
    assert max(recorded.values()) == 1, [unit for unit, count in recorded.items() if count > 1]
    expected, actual = finished(uninterrupted), finished(run_dir)
    assert actual["pairs"] == expected["pairs"]
    assert actual["metrics"] == expected["metrics"]
    assert actual["eval"] == expected["eval"]
    assert all(actual["weights"][k].equal(expected["weights"][k]) for k in expected["weights"])


SEMI_ONLINE_KILL_POINTS = ["iter_001/train/step_000001:before", "iter_001/rollouts/shard_00001",
                           "iter_001/sync/step_000002:before"]


@pytest.mark.timeout(1200)  # five runs
def test_semi_online_syncs_within_the_iteration_and_resumes_exactly_after_sigkills(config, tmp_path):
    """train.sync_every_steps=1: one round of 12 prompts in blocks of 4 (1 step x 4 pairs), the engines synced before
    the second and third; killed after a block's checkpoint, after a block's generation and during a sync, then
    resumed, the run ends with the uninterrupted run's pairs, metrics and weights."""
    semi_online = ("iterations=1", "train.sync_every_steps=1")
    uninterrupted = tmp_path / "semi_online"
    result = rlhf_loop("run", str(config), *semi_online, "--run-dir", str(uninterrupted))
    assert result.returncode == 0, result.stdout[-3000:]
    units = json.loads((uninterrupted / "manifest.json").read_text())["units"]
    assert sorted(unit for unit in units if unit.startswith("iter_001/sync/")) == [
        "iter_001/sync/step_000001", "iter_001/sync/step_000002"]
    steps = [pair["policy_step"] for pair in read_jsonl(uninterrupted / "iter_001" / "pairs.jsonl")]
    assert steps == sorted(steps) and set(steps) == {0, 1, 2}  # each block from the weights synced before it
    assert [units[f"iter_001/rollouts/shard_{i:05d}"]["policy_step"] for i in range(3)] == [0, 1, 2]

    killed_and_resumed_equals(config, semi_online, SEMI_ONLINE_KILL_POINTS, tmp_path / "killed", uninterrupted)
