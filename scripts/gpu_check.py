"""One prepared check of the CUDA path on one GPU machine: the pieces that can run without vLLM and Ray.

    python scripts/gpu_check.py --out gpu_check.json              # on a GPU machine (device cuda)
    python scripts/gpu_check.py --device cpu --out report.json    # the dry mode: the same checks on CPU (the suite)

Needs torch, transformers, peft, tokenizers, DeepSpeed and this checkout (PYTHONPATH=.); no vLLM, no Ray, no network.
It builds a small random Llama and a reward model locally, then checks, each on its own (a failure is recorded and the
next check runs):
- the learner (DeepSpeed, one rank) in float32 and bfloat16 at ZeRO 0 and 3: two DPO steps, checkpoint save and
  load, HF export, the optimizer state offloaded and reloaded (the colocation schedule), peak memory against the
  estimate `rlhf-loop plan` prints for that learner;
- the HF rollout engine and a Bradley-Terry reward model on the device;
- a one-rank broadcast through the weight-sync sender (`policy.weight_sync.SyncGroup`: NCCL on CUDA, gloo on CPU).
Writes a JSON report (what ran, seconds, numbers, the first line of any error); exits 1 if a check failed.
What it cannot cover (vLLM, Ray placement, two-GPU NCCL, colocation with a real engine): docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CORPUS = ["Name three fruits.", "Apples, bananas and cherries.", "Count to five.", "One two three four five.",
          "The waves roll in and out.", "Blue.", "dog dog dog", "What is your favourite colour?"] * 8
GOOD, BAD = ["Apples, bananas and cherries.", "One two three four five."], ["Blue.", "dog dog dog"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON report goes")
    parser.add_argument("--hidden", type=int, help="the policy's hidden size (default 512 on cuda, 64 on cpu)")
    parser.add_argument("--layers", type=int, help="its layers (default 8 on cuda, 2 on cpu)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--zero-stages", default="0,3")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here; use --device cpu for the dry mode")
    shape = dict(hidden_size=args.hidden or (512 if cuda else 64), num_layers=args.layers or (8 if cuda else 2))
    shape["num_heads"] = shape["hidden_size"] // 64 if shape["hidden_size"] >= 64 else 2  # head size 64 (vLLM-ready)

    report = {"device": args.device, "environment": environment(), "model": shape, "checks": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        models = build_models(Path(work), shape)
        for dtype in args.dtypes.split(","):
            for stage in map(int, args.zero_stages.split(",")):
                run(report, f"learner {dtype} zero{stage}",
                    lambda d=dtype, s=stage: check_learner(models, args.device, d, s, Path(work)))
        run(report, "hf engine", lambda: check_hf_engine(models, args.device))
        run(report, "reward model", lambda: check_reward(models, args.device))
        run(report, "weight sync broadcast", lambda: check_broadcast(models, args.device))
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = all(check["ok"] for check in report["checks"].values())
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    failed = [name for name, check in report["checks"].items() if not check["ok"]]
    print(f"gpu_check on {args.device}: {len(report['checks']) - len(failed)} of {len(report['checks'])} checks "
          f"passed in {report['seconds']} s" + (f"; failed: {', '.join(failed)}" if failed else "") + f" ({args.out})")
    return 0 if report["ok"] else 1


def run(report: dict, name: str, check: Callable[[], dict]) -> None:
    """One check: its numbers, or the first line of its error (and the traceback's end), never the end of the run."""
    print(f"gpu_check: {name} ...", flush=True)
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        result = {"ok": True, **check()}
    except Exception as error:  # noqa: BLE001 - every failure is a finding of the report
        first = (str(error).strip().splitlines() or [""])[0]
        result = {"ok": False, "error": f"{type(error).__name__}: {first[:300]}",
                  "traceback": traceback.format_exc().splitlines()[-12:]}
    result["seconds"] = round(time.perf_counter() - start, 2)
    report["checks"][name] = result


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "deepspeed", "peft", "vllm", "ray"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        versions.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                        cuda=torch.version.cuda, bf16_supported=torch.cuda.is_bf16_supported())
    return versions


def build_models(work: Path, shape: dict) -> dict:
    from rlhf_loop.toy.tiny import build_tiny_policy, build_tiny_reward_model, build_tokenizer

    tokenizer = build_tokenizer(CORPUS, vocab_size=512)
    return {"tokenizer": tokenizer, "policy": str(build_tiny_policy(tokenizer, work / "policy", **shape)),
            "reward": str(build_tiny_reward_model(tokenizer, work / "reward", hidden_size=64, num_layers=2,
                                                  num_heads=2))}


def make_pairs(tokenizer, count: int):
    from rlhf_loop.common.records import Pair, Response

    def response(text: str) -> Response:
        return Response(text, tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id], "stop")

    pairs = []
    for index in range(count):
        messages = [{"role": "user", "content": f"Question {index}: name some things."}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        pairs.append(Pair(prompt_index=index, prompt_messages=messages, prompt_token_ids=list(ids),
                          chosen=response(GOOD[index % 2]), rejected=response(BAD[index % 2]), chosen_score=1.0,
                          rejected_score=0.0))
    return pairs


def check_learner(models: dict, device: str, dtype: str, stage: int, work: Path) -> dict:
    from policy.config import PolicyConfig, TrainConfig
    from policy.learner import DPOLearner
    from rlhf_loop.frontend.sizing import ModelSize, training_memory

    policy = PolicyConfig(model_path=models["policy"], dtype=dtype)
    train = TrainConfig(learning_rate=1e-3, lr_schedule="constant", warmup_ratio=0.0, micro_batch_size=4,
                        gradient_accumulation_steps=1, max_length=64, max_prompt_length=32, zero_stage=stage)
    learner = DPOLearner(policy, train, device=device, seed=0)
    learner.begin_iteration(1, make_pairs(models["tokenizer"], 8), reference_dir=None)
    losses = [learner.train_steps(1).loss for _ in range(2)]
    if not all(loss == loss and abs(loss) != float("inf") for loss in losses):
        raise RuntimeError(f"the loss is not finite: {losses}")
    checkpoint = work / f"checkpoint-{dtype}-{stage}"
    learner.save_checkpoint(str(checkpoint))
    before = learner.named_weights()
    learner.load_checkpoint(str(checkpoint))
    after = learner.named_weights()
    if any(not torch.equal(a, b) for (_, a), (_, b) in zip(before, after, strict=True)):
        raise RuntimeError("the weights after load_checkpoint differ from those saved")
    learner.export_hf(str(work / f"export-{dtype}-{stage}"))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    offloaded = {}
    if device == "cuda":
        learner.offload_states()
        offloaded["allocated_after_offload_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        learner.reload_states()
        offloaded["allocated_after_reload_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
    parameters = sum(tensor.numel() for _, tensor in after)
    width = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    estimate = training_memory(ModelSize(models["policy"], parameters, "counted"), width, stage, 1,
                               with_reference=True, trained_parameters=parameters)
    del learner
    return {"losses": losses, "weights_dtype": str(after[0][1].dtype), "parameters": parameters,
            "peak_memory_mib": None if peak is None else round(peak / 2**20, 1),
            # the plan counts weights, reference, gradients and Adam; activations and the allocator's slack come on top
            "peak_over_plan": None if peak is None else round(peak / estimate.bytes_per_actor, 2),
            "plan_estimate_mib": round(estimate.bytes_per_actor / 2**20, 1), "plan_formula": estimate.formula,
            **offloaded}


def check_hf_engine(models: dict, device: str) -> dict:
    from policy.config import PolicyConfig, RolloutConfig
    from policy.hf_engine import HFEngine
    from policy.rollout_protocol import Sampling
    from rlhf_loop.common.records import Prompt

    engine = HFEngine(PolicyConfig(model_path=models["policy"]), RolloutConfig(engine="hf"), device, 256, seed=0)
    prompts = [Prompt(index=pair.prompt_index, messages=pair.prompt_messages, token_ids=pair.prompt_token_ids)
               for pair in make_pairs(models["tokenizer"], 4)]
    sampling = Sampling(n=2, temperature=1.0, top_p=1.0, max_tokens=16, seed=0)
    first, second = engine.generate(prompts, sampling), engine.generate(prompts, sampling)
    responses = [response for rollout in first for response in rollout.responses]
    if len(responses) != 8 or not all(response.token_ids for response in responses):
        raise RuntimeError(f"expected 8 non-empty responses, got {len(responses)}")
    # GPU kernels need not repeat bit for bit: recorded, not required
    return {"prompts": len(prompts), "responses": len(responses), "dtype": str(engine.model.dtype),
            "same_seeds_same_samples": first == second}


def check_reward(models: dict, device: str) -> dict:
    from reward.base import RewardQuery
    from reward.classifier import BradleyTerryReward
    from reward.config import RewardConfig

    reward = BradleyTerryReward(RewardConfig(kind="bradley_terry", model_path=models["reward"]), device)
    results = reward.score([RewardQuery(messages=[{"role": "user", "content": "Name three fruits."}],
                                        responses=GOOD + BAD)])
    scores = results[0].scores
    if len(scores) != 4 or not all(score == score for score in scores):
        raise RuntimeError(f"expected 4 finite scores, got {scores}")
    return {"scores": scores}


def check_broadcast(models: dict, device: str) -> dict:
    """The sender's code path on the device: a group of one rank (NCCL refuses two ranks of one group on one GPU),
    buckets packed on the device, broadcast, the stream settled."""
    from transformers import AutoModelForCausalLM

    from policy.weight_buckets import plan_buckets
    from policy.weight_sync import SyncGroup, SyncSpec, host_store

    model = AutoModelForCausalLM.from_pretrained(models["policy"]).to(device)
    named = [(name, param.detach()) for name, param in model.named_parameters()]
    plan = plan_buckets([(name, tensor.shape, tensor.dtype) for name, tensor in named], bucket_bytes=4 << 20)
    store = host_store("127.0.0.1")
    group = SyncGroup(SyncSpec("127.0.0.1", store.port, "gpu-check", ("learner rank 0",), 60.0), 0,
                      torch.device(device), store)
    start = time.perf_counter()
    try:
        for sync in range(2):  # one group, two syncs
            by_name = dict(named)
            group.send(sync, plan, ([by_name[slot.name] for slot in bucket.slots] for bucket in plan))
    finally:
        group.shutdown()
    seconds = time.perf_counter() - start
    total = sum(bucket.nbytes for bucket in plan)
    return {"buckets": len(plan), "bytes_per_sync": total, "two_syncs_s": round(seconds, 4)}


if __name__ == "__main__":
    sys.exit(main())
