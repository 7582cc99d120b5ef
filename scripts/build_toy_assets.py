"""Build (or reuse) the toy task's assets and print how well calibrated they are.

    python scripts/build_toy_assets.py [--dir .cache/toy_task] [--samples 8] [--prompts 64] [key=value ...]

`key=value` overrides fields of ToyTaskConfig (e.g. seed=1). The report samples K answers per held-out prompt at
temperature 1 with HF generate and gives: the gold reward of the random-init policy and of the SFT policy (pi_0, with
its best of K by gold), the reward model's accuracy on held-out synthetic pairs and on pairs of pi_0's own samples,
and the gold of the samples the reward model ranks best and worst of K (what max_min pairs take as chosen and
rejected). It says whether the build is inside the band the README's numbers assume (rlhf_loop/toy/calibration.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from rlhf_loop.toy.assets import ToyTaskConfig, ensure_toy_assets
from rlhf_loop.toy.calibration import BANDS, MIN_REWARD_ACCURACY, measure_calibration


def parse_overrides(pairs: list[str]) -> dict:
    fields = {field.name for field in dataclasses.fields(ToyTaskConfig)}
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown ToyTaskConfig field {key!r}; choose from {sorted(fields)}")
        overrides[key] = type(getattr(ToyTaskConfig(), key))(value)
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=ToyTaskConfig.dir)
    parser.add_argument("--samples", type=int, default=8, help="answers per prompt (K)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts to sample")
    parser.add_argument("overrides", nargs="*", help="ToyTaskConfig fields as key=value")
    args = parser.parse_args()

    cfg = ToyTaskConfig(enabled=True, dir=args.dir, **parse_overrides(args.overrides))
    started = time.monotonic()
    assets = ensure_toy_assets(cfg)
    stamp = json.loads(assets.stamp.read_text())
    print(f"assets ready in {time.monotonic() - started:.1f} s (the build itself took {stamp['build_seconds']} s)")
    print(f"reward model: held-out synthetic pair accuracy {stamp['reward_model']['eval_accuracy']:.3f}")
    c = measure_calibration(assets, args.samples, args.prompts, variant=cfg.variant)
    print(f"random-init policy: gold mean {c.initial_gold:.3f}")
    print(f"SFT policy (pi_0): gold mean {c.pi_0_gold:.3f}, best of {c.samples_per_prompt} by gold "
          f"{c.pi_0_best_of_k_gold:.3f}")
    print(f"reward model on pi_0's samples: pair accuracy {c.reward_accuracy:.3f} over {c.compared_pairs} pairs; "
          f"gold of its best of {c.samples_per_prompt} {c.reward_best_of_k_gold:.3f}, of its worst "
          f"{c.reward_worst_of_k_gold:.3f}")
    problems, band = c.problems(), BANDS[cfg.variant]
    print("calibration: " + ("; ".join(problems) if problems else
                             f"inside {cfg.variant}'s band (pi_0 gold {band.pi_0_gold[0]}-{band.pi_0_gold[1]}, "
                             f"best of K by gold <= {band.max_best_of_k_gold}, reward accuracy >= "
                             f"{MIN_REWARD_ACCURACY})"))


if __name__ == "__main__":
    main()
