"""Where rlhf-loop's start-up goes: each piece timed alone, in a fresh process, one after another (so the pieces do
not compete for the CPU; in a run the three actors start at once and share it).

    PYTHONPATH=. python scripts/bench_startup.py [--device cpu] [--repeats 3] [--out startup.json]

Pieces: the driver's imports and preflight, Ray's start, and per role the imports and the model build (vLLM engine,
reward model, DPO learner with DeepSpeed). A run's own record of start-up per role is RUN_DIR/placement.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from bench_common import REPO, SETTINGS, child_env, prepare_assets, write_json

# Each piece: setup code (not timed) and timed code; `spec` (the benchmark's paths) is in scope.
PIECES = {
    "driver: import rlhf_loop.frontend.cli": ("", "import rlhf_loop.frontend.cli"),
    "driver: load config + preflight": (
        "from rlhf_loop.config import load_config\nfrom rlhf_loop.frontend.preflight import preflight",
        "preflight(load_config(spec['config']))"),
    "ray.init (local cluster, 2 CPUs)": (
        "import os, ray\nos.environ.setdefault('RAY_AUTH_MODE', 'disabled')",
        "ray.init(num_cpus=2, include_dashboard=False, logging_level='WARNING')"),
    "import torch": ("", "import torch"),
    "import transformers models": ("import torch", "import transformers.models.llama.modeling_llama"),
    "import vllm": ("import torch, transformers", "import vllm"),
    "vLLM engine build (VLLMEngine)": (
        "from policy.config import PolicyConfig, RolloutConfig\nfrom policy.vllm_engine import VLLMEngine",
        "VLLMEngine(PolicyConfig(model_path=spec['policy']), RolloutConfig(), spec['device'], 128, 0)"),
    "import deepspeed": ("import torch, transformers", "import deepspeed"),
    "DPO learner build (DeepSpeed init, policy + optimizer)": (
        "from policy.config import PolicyConfig, TrainConfig\nfrom policy.learner import DPOLearner",
        "DPOLearner(PolicyConfig(model_path=spec['policy']), TrainConfig(micro_batch_size=16), spec['device'], 0)"),
    "reward model build (Bradley-Terry)": (
        "from reward.config import RewardConfig\nfrom reward.registry import build_reward_model",
        "build_reward_model(RewardConfig(model_path=spec['reward']), spec['device'])"),
}

TEMPLATE = """
import json, time, sys
began = time.perf_counter()
spec = json.loads(sys.argv[1])
{setup}
setup_s = time.perf_counter() - began
began = time.perf_counter()
{timed}
print("RESULT", json.dumps({{"setup_s": setup_s, "timed_s": time.perf_counter() - began}}), flush=True)
"""


def time_piece(name: str, spec: dict, env: dict) -> float:
    setup, timed = PIECES[name]
    code = TEMPLATE.format(setup=setup, timed=timed)
    process = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # what the piece left behind (Ray's raylet, vLLM's helpers)
    results = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not results:
        raise RuntimeError(f"{name} failed:\n{stderr[-2000:]}")
    return json.loads(results[-1].removeprefix("RESULT "))["timed_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each piece's process")
    parser.add_argument("--config", type=Path, help="run config for the preflight piece (default: the equal setting's)")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "startup.json")
    args = parser.parse_args()
    import yaml
    from bench_systems import rlhf_loop_config

    assets = prepare_assets(REPO / ".cache", [SETTINGS["equal"]])
    config = args.config
    if config is None:
        config = args.out.with_name("startup_config.yaml")
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(rlhf_loop_config(SETTINGS["equal"], assets, args.device)))
    spec = {"config": str(config), "policy": str(assets.bench_policy), "reward": str(assets.toy.reward_model),
            "device": args.device}
    env = {**os.environ, **child_env(args.device, args.threads)}
    results = {}
    for name in PIECES:
        seconds = [time_piece(name, spec, env) for _ in range(args.repeats)]
        results[name] = {"median_s": statistics.median(seconds), "all_s": seconds}
        print(f"| {name} | {results[name]['median_s']:.2f} |", flush=True)
    write_json(args.out, {"command": " ".join(sys.argv), "pieces": results})


if __name__ == "__main__":
    main()
