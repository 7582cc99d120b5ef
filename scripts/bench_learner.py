"""Learner throughput: the DPO learner's forward and backward (`policy.batching.response_log_probs`, the step's
work) on a SmolLM2-135M-shaped Llama, in tokens/s and achieved GFLOP/s against this machine's fp32 matmul rate, with
the vocabulary projection at every position (how the learner worked before, and the SFT warm start still does) and
only over the response positions (the DPO learner now), interleaved in one process.

    PYTHONPATH=. .venv/bin/python scripts/bench_learner.py [--model DIR] [--batch 8] [--prompt 60] [--response 40]
        [--repeats 5] [--threads N] [--json out.json]

Without --model the policy is random-init with SmolLM2-135M-Instruct's shape (hidden 576, 30 layers, 9 heads of 64,
3 KV heads, MLP 1536, 49,152-token vocabulary, tied embeddings): weights do not change the work. Each repeat is one
forward and backward of `batch` sequences of `prompt + response` tokens (the chosen and rejected halves of a DPO micro
batch of batch / 2 pairs). Prints a Markdown table.

FLOPs counted: 6 x (parameters outside the embedding) x tokens for the transformer body, plus 6 x hidden x vocabulary
x the response positions: the work a step must do, for both ways, so a leaner step shows as fewer seconds and more
useful GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate at the threads torch uses: the ceiling the learner is compared with."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def build_policy(model: str | None):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model:
        return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local HF causal LM directory (default: random SmolLM2-135M shape)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward (2 x pairs)")
    parser.add_argument("--prompt", type=int, default=60, help="prompt tokens per sequence")
    parser.add_argument("--response", type=int, default=40, help="response tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from policy.batching import response_log_probs
    from rlhf_loop.common.sequences import pad_pairs

    model = build_policy(args.model)
    model.train()
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    sequences = [(torch.randint(vocab, (args.prompt,), generator=generator).tolist(),
                  torch.randint(vocab, (args.response,), generator=generator).tolist()) for _ in range(args.batch)]
    batch = pad_pairs(sequences, pad_token_id=0, device=torch.device("cpu"))

    def step(every_position: bool) -> None:
        model.zero_grad(set_to_none=True)
        log_probs, _ = response_log_probs(model, batch, every_position=every_position)
        log_probs.sum().backward()

    ways = {"every position": True, "response positions": False}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for every_position in ways.values():
        step(every_position)  # warm-up, untimed
    for _ in range(args.repeats):  # interleaved, so the machine's load reaches both alike
        for way, every_position in ways.items():
            seconds[way].append(_timed(lambda: step(every_position)))
    tokens = args.batch * (args.prompt + args.response)
    embedding = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - embedding
    flops = 6 * body * tokens + 6 * hidden * vocab * args.batch * args.response
    ceiling = matmul_gflops()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "batch": args.batch, "prompt": args.prompt, "response": args.response,
        "matmul_gflops": ceiling, "ways": {},
    }
    print(f"| projection | batch x (prompt + response) | step s (median of {args.repeats}) | tokens/s | GFLOP/s | "
          "fp32 matmul GFLOP/s | share |")
    print("|---|---|---|---|---|---|---|")
    for way, times in seconds.items():
        median = statistics.median(times)
        result["ways"][way] = {"seconds": times, "median_s": median, "tokens_per_s": tokens / median,
                               "gflops": flops / median / 1e9}
        print(f"| {way} | {args.batch} x ({args.prompt} + {args.response}) | {median:.2f} | {tokens / median:.0f} | "
              f"{flops / median / 1e9:.1f} | {ceiling:.1f} | {flops / median / 1e9 / ceiling:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
