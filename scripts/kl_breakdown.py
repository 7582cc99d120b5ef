"""Where a run's KL to its reference sits: log pi(y) - log ref(y) per sample of one iteration's rollouts, its spread,
and, for multi-turn episodes, by how many turns the episode took.

    python scripts/kl_breakdown.py RUN_DIR --iteration N [--top 5]

Iteration N's rollouts were sampled from the policy iteration N - 1 exported (RUN_DIR/iter_<N-1>/policy), so their
mean log-ratio against pi_0 estimates KL(pi_{N-1} || pi_0) on the training prompts: the same quantity as iteration
N - 1's `kl/ref` on the held-out prompts, from an independent set of samples. That only holds for samples of the
policy's own distribution: rollout.temperature 1 and top_p 1. An episode's ratio sums over the policy's own tokens
(its loss mask), as the learner's does.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, like the other scripts


@dataclass(frozen=True)
class Sample:
    log_ratio: float
    turns: int | None  # None: a single-turn response
    policy_tokens: int


def summary(samples: Sequence[Sample], top: int) -> str:
    """The mean with its standard error, the quantiles, the share of the sum that the top tenth carries, and the
    breakdown by turns."""
    ratios = sorted(sample.log_ratio for sample in samples)
    n = len(ratios)
    mean = statistics.fmean(ratios)
    stderr = statistics.stdev(ratios) / math.sqrt(n) if n > 1 else math.nan
    tenth = ratios[-max(n // 10, 1):]
    lines = [f"KL estimate {mean:.3f} +- {stderr:.3f} (standard error) over {n} samples",
             f"quantiles: min {ratios[0]:.2f}, median {ratios[n // 2]:.2f}, 90% {ratios[int(0.9 * n)]:.2f}, "
             f"99% {ratios[int(0.99 * n)]:.2f}, max {ratios[-1]:.2f}",
             f"the top tenth of samples carries {sum(tenth) / sum(ratios):.2f} of the sum" if sum(ratios) > 0 else
             "the sum is not positive: no share to give"]
    by_turns: dict[int, list[Sample]] = {}
    for sample in samples:
        if sample.turns is not None:
            by_turns.setdefault(sample.turns, []).append(sample)
    if by_turns:
        lines += ["", "| turns | share of episodes | mean log-ratio | mean policy tokens |", "|---|---|---|---|"]
        lines += [f"| {turns} | {len(group) / n:.2f} | {statistics.fmean(s.log_ratio for s in group):.2f} | "
                  f"{statistics.fmean(s.policy_tokens for s in group):.1f} |" for turns, group in sorted(by_turns.items())]
    lines += ["", f"the {top} largest log-ratios: " + ", ".join(
        f"{s.log_ratio:.1f}" + (f" ({s.turns} turns)" if s.turns is not None else "")
        for s in sorted(samples, key=lambda s: -s.log_ratio)[:top])]
    return "\n".join(lines)


def log_ratios(run_dir: Path, iteration: int) -> list[Sample]:
    import torch
    from transformers import AutoModelForCausalLM

    from policy.batching import response_log_probs
    from rlhf_loop.common.sequences import pad_pairs
    from rlhf_loop.config import load_config
    from rlhf_loop.rundir.manifest import RunDir

    layout = RunDir(run_dir)
    cfg = load_config(layout.config_path)
    problems = [f"rollout.temperature is {cfg.rollout.temperature}" if cfg.rollout.temperature != 1.0 else "",
                f"rollout.top_p is {cfg.rollout.top_p}" if cfg.rollout.top_p != 1.0 else "",
                "train.reference is previous" if cfg.train.reference == "previous" else ""]
    if any(problems):
        raise SystemExit(f"kl_breakdown: {'; '.join(p for p in problems if p)}: the rollouts do not estimate KL to "
                         f"pi_0; it needs samples at temperature 1 and top_p 1 against the reference pi_0")
    if iteration < 2:
        raise SystemExit("kl_breakdown: --iteration must be >= 2 (iteration 1's rollouts come from pi_0 itself)")
    rows = [json.loads(line) for shard in sorted((layout.iteration(iteration) / "rollouts").glob("shard_*.jsonl"))
            for line in shard.read_text().splitlines() if line]
    if not rows:
        raise SystemExit(f"kl_breakdown: no rollouts in {layout.iteration(iteration) / 'rollouts'}")
    sequences, masks, samples = [], [], []
    for row in rows:
        for response in row["responses"]:
            episode = response.get("episode")
            sequences.append((row["prompt"]["token_ids"], response["token_ids"]))
            masks.append(episode["loss_mask"] if episode else None)
            samples.append((episode["turns"] if episode else None,
                            sum(episode["loss_mask"]) if episode else len(response["token_ids"])))
    totals = []
    for path in (layout.iteration(iteration - 1) / "policy", Path(cfg.policy.model_path)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        with torch.no_grad():
            totals.append(torch.cat([response_log_probs(model, pad_pairs(sequences[i:i + 32], pad, "cpu",
                                                                         masks[i:i + 32]))[0]
                                     for i in range(0, len(sequences), 32)]))
    return [Sample(float(ratio), turns, tokens)
            for ratio, (turns, tokens) in zip((totals[0] - totals[1]).tolist(), samples, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--iteration", type=int, required=True, help="whose rollouts (sampled by iteration - 1)")
    parser.add_argument("--top", type=int, default=5, help="how many of the largest log-ratios to list")
    args = parser.parse_args()
    print(f"{args.run_dir}: KL(pi_{args.iteration - 1} || pi_0) from iteration {args.iteration}'s rollouts")
    print(summary(log_ratios(args.run_dir, args.iteration), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
