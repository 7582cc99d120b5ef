"""Rewards defined outside the package, through the whole loop (`rlhf-loop run` in a subprocess, tiny models):

- kind function with a reward file in a directory of the user's: no edit of ours, only a config change;
- kind remote against a reward server that breaks in the middle of the scoring stage: the run stops with one
  clear line, and `resume` continues from the last finished shard once the server is healthy again.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from reward.config import RewardConfig
from reward.server import running_server
from rlhf_loop.common.files import read_jsonl
from tests.cli_runs import rlhf_loop

pytestmark = pytest.mark.integration

USER_REWARD = textwrap.dedent('''
    """A user's rule-based reward, in a file of theirs."""
    import os
    from pathlib import Path

    FRUITS = ("apple", "banana", "cherry", "fruit")


    def fruity(messages, response, meta):
        """Mentions of fruit, a little credit for length, and the prompt's own bonus from its dataset row."""
        text = response.lower()
        return sum(text.count(f) for f in FRUITS) + 0.01 * len(text) + meta["bonus"]


    def fruity_or_broken(messages, response, meta):
        """Logs each prompt it scores; fails (HTTP 500 from the server) on prompt 7 while BROKEN exists."""
        prompt = messages[-1]["content"]
        with open(os.environ["SCORED_LOG"], "a") as log:
            log.write(prompt + "\\n")
        if "Name 7 " in prompt and Path(os.environ["BROKEN"]).exists():
            raise RuntimeError("the reward backend is down")
        return fruity(messages, response, meta)
''')


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("user_project")
    (directory / "my_rewards.py").write_text(USER_REWARD)
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name {i} fruits, please.", "bonus": i % 3}) + "\n"
                               for i in range(40)))
    (directory / "eval.jsonl").write_text("".join(json.dumps({"prompt": f"Name a {colour} fruit.", "bonus": 0}) + "\n"
                                                  for colour in ("red", "yellow", "green")))
    return directory


def write_config(path: Path, user_dir: Path, policy_dir: Path, reward: str) -> Path:
    path.write_text(f"""
iterations: 1
policy: {{model_path: {policy_dir}}}
data: {{prompts: [{user_dir / "prompts.jsonl"}], prompts_per_iteration: 12, max_prompt_tokens: 64, shuffle: false}}
rollout: {{samples_per_prompt: 4, max_tokens: 12, shard_size: 5}}
reward: {reward}
eval: {{prompts: {user_dir / "eval.jsonl"}, num_prompts: 3}}
train: {{learning_rate: 2.0e-3, micro_batch_size: 2, gradient_accumulation_steps: 2, save_steps: 2,
        max_length: 96, max_prompt_length: 64}}
cluster: {{num_cpus: 2}}
""")
    return path


def fruity(response: str, bonus: int) -> float:
    text = response.lower()
    return sum(text.count(f) for f in ("apple", "banana", "cherry", "fruit")) + 0.01 * len(text) + bonus


def scored_rows(run_dir: Path) -> list[dict]:
    shards = sorted((run_dir / "iter_001" / "scores").glob("shard_*.jsonl"))
    return [row for shard in shards for row in read_jsonl(shard)]


def test_a_reward_function_in_a_users_file_runs_through_the_loop(user_dir, tiny_policy_dir, tmp_path):
    reward = f"{{kind: function, function: {user_dir / 'my_rewards.py'}:fruity, shard_size: 5}}"
    config = write_config(tmp_path / "run.yaml", user_dir, tiny_policy_dir, reward)
    run_dir = tmp_path / "run"
    result = rlhf_loop("run", str(config), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:]

    rows = scored_rows(run_dir)
    assert len(rows) == 12
    for row in rows:
        bonus = row["rollout"]["prompt"]["meta"]["bonus"]
        assert row["scores"] == [fruity(r["text"], bonus) for r in row["rollout"]["responses"]]
    pairs = read_jsonl(run_dir / "iter_001" / "pairs.jsonl")
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    best = {row["rollout"]["prompt"]["index"]: max(row["scores"]) for row in rows}
    assert all(p["chosen_score"] == best[p["prompt_index"]] for p in pairs)  # max_min: the best is chosen
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert metrics[0]["reward/mean"] == pytest.approx(sum(s for r in rows for s in r["scores"]) / 48)


def test_remote_server_failure_stops_the_stage_and_resume_continues(user_dir, tiny_policy_dir, tmp_path,
                                                                   monkeypatch):
    scored_log, broken = tmp_path / "scored.log", tmp_path / "BROKEN"
    monkeypatch.setenv("SCORED_LOG", str(scored_log))
    monkeypatch.setenv("BROKEN", str(broken))
    broken.touch()
    server_reward = RewardConfig(kind="function", function=f"{user_dir / 'my_rewards.py'}:fruity_or_broken")
    with running_server(server_reward) as url:
        reward = (f"{{kind: remote, shard_size: 5, remote: {{url: '{url}', max_retries: 1, backoff_s: 0.01}}}}")
        config = write_config(tmp_path / "run.yaml", user_dir, tiny_policy_dir, reward)
        run_dir = tmp_path / "run"

        failed = rlhf_loop("run", str(config), "--run-dir", str(run_dir))
        assert failed.returncode == 2, failed.stdout[-3000:]
        error = [line for line in failed.stdout.splitlines() if line.startswith("rlhf-loop: error:")]
        assert len(error) == 1 and "failed 2 times (last: HTTP 500" in error[0] and "rlhf-loop resume" in error[0]
        units = json.loads((run_dir / "manifest.json").read_text())["units"]
        assert "iter_001/scores/shard_00000" in units  # prompts 0-4: finished before the server broke
        assert "iter_001/scores/shard_00001" not in units  # prompts 5-9: prompt 7 broke it
        # Shard 2 (prompts 10-11) is scored beside shard 1 as soon as it is generated: finished or not by then
        unfinished = [5, 6, 7, 8, 9] + ([] if "iter_001/scores/shard_00002" in units else [10, 11])
        shard_0 = (run_dir / "iter_001" / "scores" / "shard_00000.jsonl").read_bytes()

        broken.unlink()
        scored_log.write_text("")
        resumed = rlhf_loop("resume", str(run_dir))
        assert resumed.returncode == 0, resumed.stdout[-3000:]

    rescored = set(scored_log.read_text().split("\n")) - {""}
    # The unfinished shards and the iteration's evaluation; shard 0 (and a finished shard 2) was not scored again.
    assert rescored - {"Name a red fruit.", "Name a yellow fruit.", "Name a green fruit."} == {
        f"Name {i} fruits, please." for i in unfinished}
    assert (run_dir / "iter_001" / "scores" / "shard_00000.jsonl").read_bytes() == shard_0
    rows = scored_rows(run_dir)
    assert [row["rollout"]["prompt"]["index"] for row in rows] == list(range(12))
    for row in rows:
        bonus = row["rollout"]["prompt"]["meta"]["bonus"]
        assert row["scores"] == pytest.approx([fruity(r["text"], bonus) for r in row["rollout"]["responses"]])
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 1
