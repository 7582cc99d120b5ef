"""Chaos soak: SIGKILL a tiny run at many points drawn on a seeded random schedule, resume after each, and compare
the result with an uninterrupted run of the same seed. Opt-in: each kill costs a restart (about 30-60 s here).

    python scripts/chaos_soak.py --kills 20 --seed 0 [--workdir /tmp/chaos] [--json out.json]

The candidate points are every unit the uninterrupted run recorded (from its journal.jsonl), each at three moments
(files written but not recorded, in the middle of the manifest write, just after), and every checkpoint write of a
learner rank. The schedule is printed before the first kill. At the end: identical pairs in every iteration,
identical metrics apart from times, identical evaluations, equal SFT and final weights, and no unit recorded twice.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf_loop.common.faults import KILL_AT_ENV  # noqa: E402
from rlhf_loop.common.files import read_jsonl  # noqa: E402
from rlhf_loop.rundir.manifest import unit_order  # noqa: E402

MOMENTS = {"checkpoint": 0, "before": 1, "manifest": 2, "after": 3}  # the order within one unit
RUN_TIMEOUT_S = 900


def build_inputs(directory: Path) -> Path:
    """Tiny models, prompts and a config like the end-to-end test's: 3 iterations, SFT warm start, 2 shards each."""
    from rlhf_loop.toy.tiny import build_tiny_policy, build_tiny_reward_model, build_tokenizer

    corpus = [f"Name {i} fruits, please. apples, bananas and cherries. Name {i} animals." for i in range(200)]
    tokenizer = build_tokenizer(corpus, vocab_size=512)
    policy, reward = build_tiny_policy(tokenizer, directory / "policy"), build_tiny_reward_model(tokenizer,
                                                                                                 directory / "rm")
    lines = lambda rows: "".join(json.dumps(row) + "\n" for row in rows)  # noqa: E731
    (directory / "prompts.jsonl").write_text(lines({"prompt": f"Name {i} fruits, please."} for i in range(60)))
    (directory / "eval.jsonl").write_text(lines({"prompt": f"Name {i} animals, please."} for i in range(6)))
    (directory / "sft.jsonl").write_text(lines({"messages": [
        {"role": "user", "content": f"Name {i} fruits, please."},
        {"role": "assistant", "content": "apples, bananas and cherries"}]} for i in range(24)))
    config = directory / "chaos.yaml"
    config.write_text(f"""
iterations: 3
policy: {{model_path: {policy}}}
data: {{prompts: [{directory / 'prompts.jsonl'}], prompts_per_iteration: 12, max_prompt_tokens: 64}}
rollout: {{samples_per_prompt: 4, max_tokens: 12, shard_size: 5}}
reward: {{model_path: {reward}, shard_size: 5}}
train: {{learning_rate: 2.0e-3, micro_batch_size: 2, gradient_accumulation_steps: 2, save_steps: 2,
        max_length: 96, max_prompt_length: 64}}
sft: {{enabled: true, dataset: {directory / 'sft.jsonl'}, micro_batch_size: 4, save_steps: 2, learning_rate: 1.0e-3,
      max_length: 96, max_prompt_length: 64}}
eval: {{prompts: {directory / 'eval.jsonl'}, num_prompts: 6, samples_per_prompt: 2}}
cluster: {{num_cpus: 2}}
""")
    return config


def rlhf_loop(*args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in its own process group, killed whole afterwards (a killed driver leaves Ray's processes behind)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(KILL_AT_ENV, None)
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    process = subprocess.Popen([sys.executable, "-m", "rlhf_loop.frontend.cli", *args], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def candidate_points(reference: Path) -> list[tuple[int, int, str]]:
    """(position, moment, point) for every kill point the reference run passed through, in the order it did."""
    points = []
    for position, line in enumerate(read_jsonl(reference / "journal.jsonl")):
        unit = line["unit"]
        points += [(position, MOMENTS["before"], f"{unit}:before"), (position, MOMENTS["manifest"], f"{unit}:manifest"),
                   (position, MOMENTS["after"], unit)]
        if "/step_" in unit:  # "iter_002/train/step_000004" -> "checkpoint:iter_002/step_000004"
            owner, step = unit.split("/")[0], unit.rsplit("/", 1)[1]
            points.append((position, MOMENTS["checkpoint"], f"checkpoint:{owner}/{step}"))
    return points


def finished(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    iterations = sorted(run_dir.glob("iter_*"), key=lambda d: unit_order(d.name))
    return {
        "pairs": [read_jsonl(d / "pairs.jsonl") for d in iterations],
        "metrics": [{k: v for k, v in m.items() if not k.startswith("time/")}
                    for m in read_jsonl(run_dir / "metrics.jsonl")],
        "eval": [read_jsonl(d / "eval.jsonl") for d in iterations],
        "weights": {name: tensor.tolist() for name, tensor in
                    {**load_file(run_dir / "sft" / "policy" / "model.safetensors"),
                     **{f"final/{k}": v for k, v in load_file(iterations[-1] / "policy" / "model.safetensors").items()}
                     }.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rlhf-loop-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    config = build_inputs(workdir)

    reference = workdir / "uninterrupted"
    result = rlhf_loop("run", str(config), "--run-dir", str(reference), "--overwrite")
    if result.returncode != 0:
        print(result.stdout[-3000:])
        return 1
    candidates = candidate_points(reference)
    schedule = sorted(random.Random(args.seed).sample(candidates, min(args.kills, len(candidates))))
    print(f"schedule (seed {args.seed}, {len(schedule)} of {len(candidates)} points):")
    print("\n".join(f"  {i + 1:2d}. {point}" for i, (_, _, point) in enumerate(schedule)), flush=True)

    run_dir, survived = workdir / "killed", 0
    for number, (_, _, point) in enumerate(schedule):
        command = ("run", str(config), "--run-dir", str(run_dir), "--overwrite") if number == 0 else (
            "resume", str(run_dir))
        result = rlhf_loop(*command, kill_at=point)
        stopped = result.returncode == -signal.SIGKILL or (point.startswith("checkpoint:") and result.returncode == 2)
        survived += stopped
        print(f"kill {number + 1:2d} at {point}: {'stopped' if stopped else f'NOT stopped (exit {result.returncode})'}",
              flush=True)
    result = rlhf_loop("resume", str(run_dir))
    if result.returncode != 0:
        print(result.stdout[-3000:])
        return 1

    recorded = Counter(line["unit"] for line in read_jsonl(run_dir / "journal.jsonl"))
    expected, actual = finished(reference), finished(run_dir)
    figures = {
        "seed": args.seed, "kills_scheduled": len(schedule), "kills_survived": survived,
        "units_recorded": len(recorded), "most_recordings_of_one_unit": max(recorded.values()),
        # killed with their work done but not recorded (before, mid-manifest, mid-checkpoint): that work was redone
        "units_redone": sum(moment != MOMENTS["after"] for _, moment, _ in schedule),
        "processes": len({line["pid"] for line in read_jsonl(run_dir / "journal.jsonl")}),
        **{f"same_{key}": actual[key] == expected[key] for key in expected},
        "minutes": round((time.monotonic() - started) / 60, 1),
    }
    print("\n| figure | value |\n|---|---|")
    print("\n".join(f"| {key} | {value} |" for key, value in figures.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    ok = survived == len(schedule) and figures["most_recordings_of_one_unit"] == 1 and all(
        figures[f"same_{key}"] for key in expected)
    print("result:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
