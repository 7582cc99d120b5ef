"""The benchmark's TRL system: `trl.experimental.online_dpo.OnlineDPOTrainer` (TRL 1.16) on the same policy, reward
model and prompts as rlhf-loop, in one process with HF generate. Run by scripts/bench.py:

    python scripts/bench_trl.py SPEC.json RESULT.json

Where it cannot match rlhf-loop exactly (RESULT.json's notes say it too): OnlineDPOTrainer samples 2 completions
per prompt, whatever rlhf-loop's K; it generates, scores and takes one DPO step per batch of prompts, where rlhf-loop
generates for the whole iteration first; it writes no checkpoint while training and has no held-out evaluation.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil

PROCESS_START = psutil.Process().create_time()  # start-up counts from the process's birth, imports included


def timed_method(owner, name: str, seconds: dict[str, float], key: str, on_result=None) -> None:
    """Replace owner.name by a wrapper that adds its wall time to seconds[key]."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        result = original(*args, **kwargs)
        seconds[key] += time.perf_counter() - began
        if on_result is not None:
            on_result(result)
        return result

    setattr(owner, name, wrapper)


def main(spec_path: str, result_path: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from rlhf_loop.config import DataConfig
    from rlhf_loop.driver.data import iteration_prompts

    spec = json.loads(Path(spec_path).read_text())
    setting, device, work_dir = spec["setting"], spec["device"], Path(spec["work_dir"])
    policy_dir = spec["policy_dir"]
    reward_dir = str(Path(spec["assets"]["toy_dir"]) / "reward_model")
    torch.manual_seed(setting["seed"])

    tokenizer = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    data = DataConfig(prompts=[str(Path(spec["assets"]["toy_dir"]) / "train_prompts.jsonl")],
                      prompts_per_iteration=setting["prompts_per_iteration"],
                      max_prompt_tokens=setting["max_prompt_tokens"])
    prompts = [prompt.messages for iteration in range(1, setting["iterations"] + 1)
               for prompt in iteration_prompts(data, iteration, tokenizer, setting["seed"]).prompts]
    dataset = Dataset.from_list([{"prompt": messages} for messages in prompts])

    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=torch.float32)
    reward_tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    args = OnlineDPOConfig(
        output_dir=str(work_dir / "trl"), use_cpu=device == "cpu", report_to="none", save_strategy="no",
        logging_steps=10_000, per_device_train_batch_size=setting["micro_batch_size"],
        gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=setting["learning_rate"],
        lr_scheduler_type="cosine", warmup_steps=0.1, max_grad_norm=1.0, beta=[setting["beta"]],
        loss_type="sigmoid", max_new_tokens=setting["max_tokens"], max_length=setting["max_length"],
        temperature=1.0, top_p=1.0, seed=setting["seed"], bf16=False, fp16=False, disable_dropout=True,
        dataloader_num_workers=0,
    )
    trainer = OnlineDPOTrainer(model=policy, ref_model=reference, reward_funcs=reward_model, args=args,
                               train_dataset=dataset, processing_class=tokenizer,
                               reward_processing_classes=reward_tokenizer)
    seconds = {"generate_s": 0.0, "score_s": 0.0}
    counts = {"tokens": 0}

    def count_tokens(result) -> None:
        counts["tokens"] += int(result[3].sum())  # completion_mask

    timed_method(trainer, "_generate", seconds, "generate_s", count_tokens)
    timed_method(trainer, "_calculate_rewards_from_functions", seconds, "score_s")
    ready = time.time()

    began = time.perf_counter()
    trainer.train()
    work = time.perf_counter() - began
    stages = {**seconds, "train_s": work - seconds["generate_s"] - seconds["score_s"], "sync_s": None,
              "eval_s": None}
    notes = [
        "work = trainer.train(); train = train() less its generate and score calls (DPO forward/backward, "
        "reference forward, optimizer, TRL's own bookkeeping)",
        f"OnlineDPOTrainer samples 2 completions per prompt (setting K={setting['samples_per_prompt']}); HF "
        "generate, no vLLM (TRL's vLLM modes need the CUDA vllm package)",
        "generate, score and one DPO step per batch of prompts; no weight sync (generation uses the trained "
        "model itself); no checkpoints while training; no held-out evaluation",
    ]
    Path(result_path).write_text(json.dumps({
        "work_s": work, "stages": stages, "tokens": counts["tokens"], "scores": 2 * len(prompts),
        "pairs": len(prompts), "startup": {"process (imports, 3 models, trainer)": ready - PROCESS_START},
        "notes": notes,
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
