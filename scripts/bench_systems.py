"""The benchmark's systems, each run as its own process tree and read back into one row of numbers: rlhf-loop
(`rlhf-loop run` on a generated config), TRL's OnlineDPOTrainer (bench_trl.py), a stage-per-process chain
(bench_chain.py), and vLLM driven directly (bench_vllm.py: generation only, the rollout stage's meter). Every row has
the same keys (see `row`); a number a system cannot give is None.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from bench_common import Assets, Setting, child_env, python_command, run_measured, write_json

SYSTEMS = ("rlhf-loop", "trl", "chain", "vllm")
SCRIPTS = {"trl": "bench_trl.py", "chain": "bench_chain.py", "vllm": "bench_vllm.py"}


def row(system: str, setting: Setting, measured, work_s: float, stages: dict[str, float], tokens: float,
        scores: int, pairs: int, startup: dict[str, float], notes: list[str]) -> dict:
    """One measurement. Loop overhead: the work-only wall less the time inside generate, score, train, sync (and
    eval, where the system evaluates): what orchestration, pair building and bookkeeping cost."""
    inside = sum(stages.get(key, 0.0) or 0.0 for key in ("generate_s", "score_s", "train_s", "sync_s", "eval_s"))
    generate_s, score_s, train_s = stages.get("generate_s"), stages.get("score_s"), stages.get("train_s")
    return {
        "system": system, "setting": setting.name, "returncode": measured.returncode,
        "whole_s": measured.wall_s, "work_s": work_s, **stages,
        "gen_tokens_per_s": tokens / generate_s if generate_s else None,
        "scores_per_s": scores / score_s if score_s else None,
        "pairs_per_s": pairs / train_s if train_s else None,
        # TRL's train time is what its train() spends outside generate and score: no overhead to separate
        "overhead_s": None if system in ("trl", "vllm") else work_s - inside,
        "overhead_pct": None if system in ("trl", "vllm") or not work_s else 100.0 * (work_s - inside) / work_s,
        "startup_s": startup, "peak_rss_mb": measured.peak_rss_mb, "peak_pss_mb": measured.peak_pss_mb,
        "tokens": tokens, "scores": scores, "pairs": pairs, "notes": notes,
    }


# ---- rlhf-loop ---------------------------------------------------------------------------------------------------

def rlhf_loop_config(setting: Setting, assets: Assets, device: str) -> dict:
    config = {
        "iterations": setting.iterations, "seed": setting.seed, "device": device,
        "policy": {"model_path": str(assets.policy(setting))},
        "data": {"prompts": [str(assets.toy.train_prompts)], "prompts_per_iteration": setting.prompts_per_iteration,
                 "max_prompt_tokens": setting.max_prompt_tokens},
        "rollout": {"engine": "vllm", "samples_per_prompt": setting.samples_per_prompt, "temperature": 1.0,
                    "max_tokens": setting.max_tokens, "shard_size": setting.shard_size},
        "reward": {"kind": "bradley_terry", "model_path": str(assets.toy.reward_model),
                   "batch_size": setting.reward_batch_size},
        "train": {"loss_type": "sigmoid", "beta": setting.beta, "learning_rate": setting.learning_rate,
                  "micro_batch_size": setting.micro_batch_size, "epochs": 1, "max_length": setting.max_length,
                  "max_prompt_length": setting.max_prompt_tokens, "save_steps": setting.save_steps},
        "cluster": {"num_cpus": 2},
    }
    if device == "cuda":  # every role shares one GPU (docs/gpu.md)
        config["rollout"].update(gpus_per_engine=0.3, gpu_memory_utilization=0.25)
        config["train"]["gpus_per_worker"] = 0.4
        config["reward"]["num_gpus"] = 0.2
    if setting.evaluate:
        config["eval"] = {"prompts": str(assets.toy.eval_prompts), "num_prompts": 128, "samples_per_prompt": 8,
                          "gold_reward": "rlhf_loop.toy.task:gold_reward"}
    return config


def run_rlhf_loop(setting: Setting, assets: Assets, device: str, work_dir: Path, threads: int) -> dict:
    import yaml

    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(rlhf_loop_config(setting, assets, device), sort_keys=False))
    run_dir = work_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "rlhf_loop.frontend.cli", "run", str(config_path), "--run-dir", str(run_dir)]
    measured = run_measured(command, work_dir / "console.log", child_env(device, threads))
    if measured.returncode != 0:
        raise RuntimeError(f"rlhf-loop failed (exit {measured.returncode}); see {work_dir / 'console.log'}")
    row = rlhf_loop_row(setting, run_dir, measured)
    # The weights are not needed to read the numbers back (--reread), and a SmolLM2 run writes 2 GB of them
    for weights in [*run_dir.glob("iter_*/learner"), *run_dir.glob("iter_*/policy")]:
        shutil.rmtree(weights)
    return row


def rlhf_loop_row(setting: Setting, run_dir: Path, measured) -> dict:
    """Work only: the driver log's wall time from "start-up: ..." (every actor ready) to the last iteration's line;
    what it holds beyond the recorded units (time/iteration_s: generate, score, train, sync, eval) shows as loop
    overhead. Start-up: each role's, and the driver's own count from launch to every actor ready."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    placement = json.loads((run_dir / "placement.json").read_text())

    def total(key: str) -> float:
        return sum(m.get(key, 0.0) for m in metrics)

    stages = {name: total(f"time/{name}") for name in ("generate_s", "score_s", "train_s", "sync_s", "eval_s")}
    stages["eval_s"] += baseline_eval_seconds(run_dir)
    stages["recorded_iteration_s"] = total("time/iteration_s")
    work = driver_log_work_seconds(run_dir / "logs" / "driver.log")
    scores = sum(m["prompts/count"] * setting.samples_per_prompt for m in metrics)
    tokens = sum(m["prompts/count"] * setting.samples_per_prompt * m["rollout/response_tokens_mean"] for m in metrics)
    pairs = int(total("pairs/count"))
    startup = {role: info["startup_s"] for role, info in placement.items()}
    startup["launch to every actor ready"] = driver_log_ready_after_launch(run_dir / "logs" / "driver.log")
    notes = ["work = driver log from every actor ready to the last iteration's end (baseline evaluation included "
             "where the setting evaluates); recorded_iteration_s = sum of time/iteration_s",
             "sync = learner -> vLLM in memory (time/sync_s)"]
    return row("rlhf-loop", setting, measured, work, stages, tokens, scores, pairs, startup, notes)


def driver_log_work_seconds(log: Path) -> float:
    from datetime import datetime

    def stamp(line: str) -> float:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()

    lines = log.read_text().splitlines()
    ready = next(stamp(line) for line in lines if " rlhf_loop.cluster.roles: start-up: " in line)
    last = [stamp(line) for line in lines if re.search(r" INFO rlhf_loop: iter \d+/\d+ ", line)][-1]
    return last - ready


def driver_log_ready_after_launch(log: Path) -> float:
    line = next(line for line in log.read_text().splitlines() if " rlhf_loop.cluster.roles: start-up: " in line)
    return float(re.search(r"every actor ready ([\d.]+) s after launch", line).group(1))


def baseline_eval_seconds(run_dir: Path) -> float:
    """The evaluation of pi_0 before iteration 1 is work too, but outside every iteration's time/iteration_s."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return manifest["units"].get("eval_initial", {}).get("seconds", 0.0)


# ---- TRL and the chain: their own scripts write a result JSON ----------------------------------------------------

def run_script_system(system: str, script: str, setting: Setting, assets: Assets, device: str,
                      work_dir: Path, threads: int) -> dict:
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    spec = work_dir / "spec.json"
    write_json(spec, {"setting": setting, "assets": assets, "policy_dir": assets.policy(setting), "device": device,
                      "work_dir": work_dir})
    result_path = work_dir / "result.json"
    measured = run_measured(python_command(script, str(spec), str(result_path)), work_dir / "console.log",
                            child_env(device, threads))
    if measured.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"{system} failed (exit {measured.returncode}); see {work_dir / 'console.log'}")
    result = json.loads(result_path.read_text())
    return row(system, setting, measured, result["work_s"], result["stages"], result["tokens"], result["scores"],
               result["pairs"], result["startup"], result["notes"])


def run_system(system: str, setting: Setting, assets: Assets, device: str, work_dir: Path, threads: int) -> dict:
    """`threads`: OMP_NUM_THREADS of every process of the system (Ray passes the driver's on to rlhf-loop's actors;
    without it Ray would give each actor 1, as they reserve no whole core)."""
    if system == "rlhf-loop":
        return run_rlhf_loop(setting, assets, device, work_dir, threads)
    if system in SCRIPTS:
        return run_script_system(system, SCRIPTS[system], setting, assets, device, work_dir, threads)
    raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")
