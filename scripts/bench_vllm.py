"""The rollout meter: vLLM driven directly, as a user's own script would, on the same model, engine configuration,
prompts and sampling as rlhf-loop's rollout stage; scripts/bench.py (system "vllm") sets the two side by side.

    python scripts/bench_vllm.py SPEC.json RESULT.json

One process, one `LLM`, one `generate` call over every prompt of the setting (vLLM's own best: the largest batch),
in-process engine core as rlhf-loop's engines run it on CPU. The prompts are the run's first iteration's and every
prompt has the seed rlhf-loop gives it, so both generate the same tokens and the token counts check the work is equal.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil

PROCESS_START = psutil.Process().create_time()
GIB = 1 << 30


def main(spec_path: str, result_path: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # as rlhf-loop's engines (policy/vllm_engine.py)
    from vllm import LLM, SamplingParams, TokensPrompt

    from rlhf_loop.common.seeds import derived_seed
    from rlhf_loop.config import DataConfig
    from rlhf_loop.driver.data import iteration_prompts

    spec = json.loads(Path(spec_path).read_text())
    setting, device = spec["setting"], spec["device"]
    engine_options = (dict(enforce_eager=True, kv_cache_memory_bytes=GIB, enable_chunked_prefill=False,
                           enable_prefix_caching=False) if device == "cpu" else dict(gpu_memory_utilization=0.5))
    llm = LLM(model=spec["policy_dir"], dtype="float32" if device == "cpu" else "bfloat16",
              max_model_len=setting["max_prompt_tokens"] + setting["max_tokens"], seed=setting["seed"],
              **engine_options)
    data = DataConfig(prompts=[str(Path(spec["assets"]["toy_dir"]) / "train_prompts.jsonl")],
                      prompts_per_iteration=setting["prompts_per_iteration"],
                      max_prompt_tokens=setting["max_prompt_tokens"])
    prompts = iteration_prompts(data, 1, llm.get_tokenizer(), setting["seed"]).prompts
    iteration_seed = derived_seed(setting["seed"], "rollout", 1)
    requests = [TokensPrompt(prompt_token_ids=list(prompt.token_ids)) for prompt in prompts]
    sampling = [SamplingParams(n=setting["samples_per_prompt"], temperature=1.0, top_p=1.0,
                               max_tokens=setting["max_tokens"], seed=derived_seed(iteration_seed, prompt.index),
                               detokenize=False) for prompt in prompts]
    ready = time.time()
    began = time.perf_counter()
    outputs = llm.generate(requests, sampling, use_tqdm=False)
    seconds = time.perf_counter() - began
    tokens = sum(len(sample.token_ids) for output in outputs for sample in output.outputs)
    Path(result_path).write_text(json.dumps({
        "work_s": seconds, "stages": {"generate_s": seconds, "score_s": None, "train_s": None, "sync_s": None,
                                      "eval_s": None},
        "tokens": tokens, "scores": 0, "pairs": 0, "startup": {"process (imports, engine)": ready - PROCESS_START},
        "notes": ["vLLM driven directly: one generate call over the setting's prompts (the run's first iteration's, "
                  "with rlhf-loop's per-prompt seeds); no scoring or training"],
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
