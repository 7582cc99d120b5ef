"""The benchmark's stage-per-process chain, as script-chain pipelines run online DPO: per iteration one process
generates (vLLM, loading the policy from disk), one scores and builds the pairs (the reward model), one trains DPO
(DeepSpeed, as rlhf-loop's learner) and saves the policy to disk; the next iteration's generator loads that.
Every stage is rlhf-loop's own code (policy/vllm_engine.py, reward/, policy/learner.py), only in fresh processes.

    python scripts/bench_chain.py SPEC.json RESULT.json                   # the chain (run by scripts/bench.py)
    python scripts/bench_chain.py --stage NAME SPEC.json ITERATION OUT.json   # one stage (run by the chain)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("generate", "score", "train")


# ---- the chain driver: light, it imports no model library ------------------------------------------------------

def chain(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    work_dir = Path(spec["work_dir"])
    totals = {"generate_s": 0.0, "score_s": 0.0, "train_s": 0.0, "sync_s": 0.0, "pairs_s": 0.0}
    startup: dict[str, list[float]] = {stage: [] for stage in STAGES}
    work = tokens = scores = pairs = 0.0
    for iteration in range(1, spec["setting"]["iterations"] + 1):
        for stage in STAGES:
            out = work_dir / f"iter_{iteration:03d}_{stage}.json"
            launched = time.time()
            subprocess.run([sys.executable, __file__, "--stage", stage, spec_path, str(iteration), str(out)],
                           check=True)
            report = json.loads(out.read_text())
            startup[stage].append(report["ready"] - launched)
            work += report["work_s"]
            for key, seconds in report["seconds"].items():
                totals[key] += seconds
            tokens += report.get("tokens", 0)
            scores += report.get("scores", 0)
            pairs += report.get("pairs", 0)
    for iteration in range(1, spec["setting"]["iterations"] + 1):  # the saved policies: 540 MB each for SmolLM2
        shutil.rmtree(work_dir / f"policy_{iteration:03d}", ignore_errors=True)
    stages = {key: value for key, value in totals.items() if key != "pairs_s"}
    Path(result_path).write_text(json.dumps({
        "work_s": work, "stages": {**stages, "eval_s": None}, "tokens": tokens, "scores": int(scores),
        "pairs": int(pairs),
        "startup": {f"{stage} (mean of {len(values)})": sum(values) / len(values) for stage, values in startup.items()},
        "notes": [
            "work = sum over the stage processes of their work (generate, score + pairs, train + save); start-up = "
            "process launch until its models are loaded, per stage process",
            "sync = the trainer saving the policy (HF format); its reload is inside the next generator's start-up",
            "generation in one call per iteration (rlhf-loop: shards of 64 prompts); no learner checkpoints",
        ],
    }))


# ---- the stages, each in its own process ------------------------------------------------------------------------

def policy_dir(spec: dict, iteration: int) -> str:
    """pi_0 for iteration 1; afterwards what the previous iteration's trainer saved."""
    if iteration > 1:
        return str(Path(spec["work_dir"]) / f"policy_{iteration - 1:03d}")
    return spec["policy_dir"]


def stage(name: str, spec_path: str, iteration: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    report = {"generate": generate, "score": score, "train": train}[name](spec, int(iteration))
    Path(out_path).write_text(json.dumps(report))


def generate(spec: dict, iteration: int) -> dict:
    from policy.config import PolicyConfig, RolloutConfig
    from policy.rollout_protocol import Sampling
    from policy.vllm_engine import VLLMEngine
    from rlhf_loop.common import records
    from rlhf_loop.config import DataConfig
    from rlhf_loop.driver.data import iteration_prompts
    from rlhf_loop.common.files import atomic_write_jsonl
    from rlhf_loop.common.seeds import derived_seed

    setting, work_dir = spec["setting"], Path(spec["work_dir"])
    pi_0 = policy_dir(spec, 1)
    policy = PolicyConfig(model_path=policy_dir(spec, iteration), tokenizer_path=pi_0)
    rollout = RolloutConfig(samples_per_prompt=setting["samples_per_prompt"], max_tokens=setting["max_tokens"],
                            shard_size=setting["shard_size"])
    engine = VLLMEngine(policy, rollout, spec["device"], setting["max_prompt_tokens"] + setting["max_tokens"],
                        setting["seed"])
    data = DataConfig(prompts=[str(Path(spec["assets"]["toy_dir"]) / "train_prompts.jsonl")],
                      prompts_per_iteration=setting["prompts_per_iteration"],
                      max_prompt_tokens=setting["max_prompt_tokens"])
    prompts = iteration_prompts(data, iteration, engine.tokenizer, setting["seed"]).prompts
    ready = time.time()
    began = time.perf_counter()
    sampling = Sampling(n=setting["samples_per_prompt"], temperature=1.0, top_p=1.0,
                        max_tokens=setting["max_tokens"], seed=derived_seed(setting["seed"], "rollout", iteration))
    rollouts = engine.generate(prompts, sampling)
    atomic_write_jsonl(work_dir / f"iter_{iteration:03d}_rollouts.jsonl", map(records.to_json, rollouts))
    seconds = time.perf_counter() - began
    tokens = sum(len(response.token_ids) for r in rollouts for response in r.responses)
    return {"ready": ready, "work_s": seconds, "seconds": {"generate_s": seconds}, "tokens": tokens}


def score(spec: dict, iteration: int) -> dict:
    from reward.config import RewardConfig
    from reward.registry import build_reward_model
    from rlhf_loop.common import records
    from rlhf_loop.driver.pairs import select_pairs
    from rlhf_loop.common.files import atomic_write_jsonl, read_jsonl
    from rlhf_loop.common.seeds import derived_seed
    from rlhf_loop.driver.stages import score_rollouts

    setting, work_dir = spec["setting"], Path(spec["work_dir"])
    reward = build_reward_model(RewardConfig(kind="bradley_terry",
                                             model_path=str(Path(spec["assets"]["toy_dir"]) / "reward_model"),
                                             batch_size=setting["reward_batch_size"]), spec["device"])
    ready = time.time()
    began = time.perf_counter()
    rollouts = [records.rollout_from_json(row) for row in read_jsonl(work_dir / f"iter_{iteration:03d}_rollouts.jsonl")]
    scored = score_rollouts(reward, rollouts, 0.0)
    scored_s = time.perf_counter() - began
    selection = select_pairs(scored, "max_min", 0.0, derived_seed(setting["seed"], "pairs", iteration))
    atomic_write_jsonl(work_dir / f"iter_{iteration:03d}_pairs.jsonl", map(records.to_json, selection.pairs))
    seconds = time.perf_counter() - began
    return {"ready": ready, "work_s": seconds, "seconds": {"score_s": scored_s, "pairs_s": seconds - scored_s},
            "scores": sum(len(r.responses) for r in rollouts)}


def train(spec: dict, iteration: int) -> dict:
    from policy.config import PolicyConfig, TrainConfig
    from policy.learner import DPOLearner
    from rlhf_loop.common import records
    from rlhf_loop.common.files import read_jsonl

    setting, work_dir = spec["setting"], Path(spec["work_dir"])
    train_cfg = TrainConfig(loss_type="sigmoid", beta=setting["beta"], learning_rate=setting["learning_rate"],
                            micro_batch_size=setting["micro_batch_size"], epochs=1,
                            max_length=setting["max_length"], max_prompt_length=setting["max_prompt_tokens"])
    pi_0 = policy_dir(spec, 1)
    learner = DPOLearner(PolicyConfig(model_path=policy_dir(spec, iteration), tokenizer_path=pi_0), train_cfg,
                         spec["device"], setting["seed"])
    ready = time.time()
    began = time.perf_counter()
    pairs = [records.pair_from_json(row) for row in read_jsonl(work_dir / f"iter_{iteration:03d}_pairs.jsonl")]
    total = learner.begin_iteration(iteration, pairs, reference_dir=pi_0)  # the reference is pi_0, as in the loop
    learner.train_steps(total)
    trained = time.perf_counter() - began
    learner.export_hf(str(work_dir / f"policy_{iteration:03d}"))
    seconds = time.perf_counter() - began
    return {"ready": ready, "work_s": seconds, "seconds": {"train_s": trained, "sync_s": seconds - trained},
            "pairs": len(pairs)}


if __name__ == "__main__":
    if sys.argv[1] == "--stage":
        stage(*sys.argv[2:])
    else:
        chain(*sys.argv[1:])
