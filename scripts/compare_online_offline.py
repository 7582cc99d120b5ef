"""Online vs semi-online vs offline DPO on a task with a gold reward, each at its own best learning rate: do fresh
on-policy pairs pay?

    python scripts/compare_online_offline.py [--model toy|smollm2] [--task short_lists|long_lists] \
        [--arms offline semi_online online] \
        [--asset-seeds 0 1 2] [--run-seeds 0 1] [--learning-rates 1e-4 2e-4 4e-4 8e-4] [--sync-every S] \
        [--runs-dir runs/compare] [--jobs 1] [--json results.json] [--plot curves.png] [--smoke]

configs/tiny_online.yaml runs 3 iterations of online DPO; configs/tiny_offline.yaml one round of DPO on the same
total number of pairs, all sampled from pi_0; configs/tiny_semi_online.yaml the same round, but the rollout engines get
the learner's weights every `train.sync_every_steps` optimizer steps (8; `--sync-every` changes it) and each next block
of pairs is sampled from them. All three have the same prompts, pair budget and DPO steps. An asset seed builds its
own toy task (tokenizer, pi_0, reward model, prompts: `toy_task.seed`); a run seed drives sampling, pair choice and
training order (`seed`). `--task long_lists` runs it on the variant where pi_0 does not cover the answers (prompts ask
for 6-10 words, pi_0 gives at most half: `toy_task.variant`, rlhf_loop/toy/task.py), with assets of its own.

1. Sweep: each arm at each learning rate, on every asset seed with the first run seed.
2. Each arm takes the learning rate with the highest mean final gold (`eval/gold_mean` on held-out prompts).
3. At those rates, every asset seed x run seed: the gold curve per iteration, what else moved by the end (KL to
   pi_0, length, reward-model score), and the verdict. The gap is paired by asset seed (every arm starts from the
   same pi_0), and standard errors treat the asset seed as the unit: the run seeds of one asset seed are averaged
   first, so a lucky set of assets cannot count three times. A gap counts as a win above 3 standard errors.
4. The mechanism: the share of each arm's pairs whose chosen answer scores (gold) above pi_0's best of K on its
   prompt, per third of the pair budget (pi_0's K samples on every prompt are the offline arm's rollouts).

`--model smollm2` runs the same three arms on the real model, SmolLM2-135M-Instruct, with configs/smollm2_online.yaml,
smollm2_offline.yaml and smollm2_semi_online.yaml (3 iterations x 32 list requests against one round of 96, the gold
rule as the reward: configs/smollm2.yaml). There is one model and one prompt set, so no asset seeds: the run seeds are
the independent units of the standard errors.

`--smoke` checks that the whole pipeline runs, in minutes: 32 prompts an online iteration (96 a round), 16 held-out
prompts x 2 samples, a sync every 2 steps, any number of rates; its numbers are not a result.

Finished runs are reused and unfinished ones resumed, so the script can be stopped and started again. Tables go
to stdout, the runs' own output to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = ("offline", "semi_online", "online")


@dataclass(frozen=True)
class Model:
    """What the arms train: their configs (`{prefix}_{arm}.yaml`), the demo's rate and what a standard error treats as
    independent."""

    config_prefix: str
    shipped_learning_rate: float  # the demo config's train.learning_rate: the shared-rate note
    unit: str  # asset seed: each builds its own toy task; run seed: one real model and prompt set

    def config(self, arm: str) -> Path:
        return REPO / "configs" / f"{self.config_prefix}_{arm}.yaml"


MODELS = {"toy": Model("tiny", 4e-4, "asset seed"), "smollm2": Model("smollm2", 1e-5, "run seed")}
ONLINE_ITERATIONS = 3  # configs/tiny_online.yaml's; the one-round arms take as many prompts as its iterations together
TASKS = ("short_lists", "long_lists")  # toy_task.variant
# --smoke: every stage of every arm in minutes (prompts an online iteration; held-out prompts and samples; sync steps)
SMOKE = {"prompts": 32, "eval": ["eval.num_prompts=16", "eval.samples_per_prompt=2"], "sync_every": 2}

# What moved besides gold, after the last iteration: how far from pi_0 (kl/ref), whether length was gamed, and what the
# reward model thinks; these tell apart a policy that improved from one that drifted where the reward model is blind.
# dpo/chosen_reward below zero means DPO lowered the likelihood of the very responses it was told to prefer.
WIN_STANDARD_ERRORS = 3  # a gap counts as a win above this many standard errors
DIAGNOSTICS = ("kl/ref", "dpo/chosen_reward", "eval/response_tokens_mean", "eval/reward_mean",
               "eval/win_rate_vs_initial")


@dataclass(frozen=True)
class Arm:
    """One run of the comparison: which config, at which rate, on which assets, with which seed."""

    name: str  # offline | semi_online | online
    learning_rate: float
    asset_seed: int
    run_seed: int
    task: str = "short_lists"  # toy_task.variant
    extra: tuple[str, ...] = ()  # further overrides (--sync-every, --smoke's sizes)
    model: str = "toy"  # MODELS

    @property
    def key(self) -> tuple[int, int]:
        """(independent unit, replicate within it): what the tables average and pair by."""
        return (self.asset_seed, self.run_seed) if MODELS[self.model].unit == "asset seed" else (self.run_seed, 0)

    def run_dir(self, runs_dir: Path) -> Path:
        if self.model != "toy":
            return runs_dir / f"{self.model}-{self.name}-lr{self.learning_rate:g}-seed{self.run_seed}"
        task = "" if self.task == "short_lists" else f"{self.task}-"
        return runs_dir / f"{task}{self.name}-lr{self.learning_rate:g}-assets{self.asset_seed}-seed{self.run_seed}"

    def overrides(self) -> list[str]:
        if self.model != "toy":
            return [f"seed={self.run_seed}", f"train.learning_rate={self.learning_rate:g}", *self.extra]
        # Asset seed 0 of the default task shares the demo's cache; the others get their own.
        cache = ".cache/toy_task" + ("" if self.task == "short_lists" else f"_{self.task}")
        cache += "" if self.asset_seed == 0 else f"_seed{self.asset_seed}"
        task = [] if self.task == "short_lists" else [f"toy_task.variant={self.task}"]
        return [f"seed={self.run_seed}", f"train.learning_rate={self.learning_rate:g}",
                f"toy_task.seed={self.asset_seed}", f"toy_task.dir={cache}", *task, *self.extra]


def run(arm: Arm, runs_dir: Path) -> Path:
    """Run (or finish) one arm; returns its run directory."""
    from rlhf_loop.frontend.status import run_status

    run_dir = arm.run_dir(runs_dir)
    if (run_dir / "manifest.json").exists():
        if run_status(str(run_dir))["finished"]:
            return run_dir
        command = ["resume", str(run_dir)]
    else:
        command = ["run", str(MODELS[arm.model].config(arm.name)), *arm.overrides(), "--run-dir", str(run_dir)]
    print(f"$ rlhf-loop {' '.join(command)}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "rlhf_loop.frontend.cli", *command], check=True, cwd=REPO, stdout=sys.stderr)
    drop_learner_checkpoints(run_dir)
    return run_dir


def drop_learner_checkpoints(run_dir: Path) -> None:
    """A finished run's learner checkpoints (iter_*/learner/) go: the comparison reads metrics, rollouts and pairs,
    and on SmolLM2 the checkpoints are 1.6 GB an iteration, about 40 GB over the 19 runs of the README's sweep."""
    for learner in run_dir.glob("iter_*/learner"):
        shutil.rmtree(learner)


def gold_curve(run_dir: Path) -> list[float]:
    """eval/gold_mean of pi_0 (iteration 0), then after each iteration."""
    units = json.loads((run_dir / "manifest.json").read_text())["units"]
    curve = [units["eval_initial"]["metrics"]["eval/gold_mean"]]
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        curve.append(json.loads(line)["eval/gold_mean"])
    return curve


def final_metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def clustered(values: dict[tuple[int, int], float]) -> tuple[float, float]:
    """Mean and standard error of values keyed by (unit, replicate), Arm.key: (asset seed, run seed) on the toy task,
    where run seeds are averaged within each asset seed first and the asset seeds are the independent units."""
    per_asset: dict[int, list[float]] = {}
    for (asset_seed, _), value in sorted(values.items()):
        per_asset.setdefault(asset_seed, []).append(value)
    return mean_and_standard_error([statistics.fmean(group) for group in per_asset.values()])


def cell(mean_se: tuple[float, float]) -> str:
    return "{:.3f} +- {:.3f}".format(*mean_se)


def sweep_table(finals: dict[str, dict[float, dict[tuple[int, int], float]]], unit: str = "asset seed") -> str:
    """Final gold per arm and learning rate, the best of each arm marked."""
    rates = sorted({rate for per_rate in finals.values() for rate in per_rate})
    lines = [f"final eval/gold_mean per learning rate (sweep), mean +- standard error over {unit}s", "",
             "| learning rate | " + " | ".join(finals) + " |", "|---|" + "---|" * len(finals)]
    best = {name: best_rate(per_rate) for name, per_rate in finals.items()}
    for rate in rates:
        cells = [cell(clustered(per_rate[rate])) + (" (best)" if rate == best[name] else "") if rate in per_rate
                 else "" for name, per_rate in finals.items()]
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    for name, rate in best.items():
        if rate in (rates[0], rates[-1]) and len(rates) > 1:
            lines.append(f"\nwarning: {name}'s best rate {rate:g} is at the edge of the sweep; widen it past {rate:g} "
                         f"to be sure it is {name}'s best")
    return "\n".join(lines)


def best_rate(per_rate: dict[float, dict[tuple[int, int], float]]) -> float:
    return max(per_rate, key=lambda rate: clustered(per_rate[rate])[0])


def curve_table(curves: dict[str, dict[tuple[int, int], list[float]]], rates: dict[str, float],
                unit: str = "asset seed") -> str:
    iterations = max(len(curve) for per_seed in curves.values() for curve in per_seed.values())
    units = len({asset for per_seed in curves.values() for asset, _ in per_seed})
    runs = len(next(iter(curves.values())))
    header = " | ".join(f"{name} (lr {rates[name]:g})" for name in curves)
    lines = [f"eval/gold_mean per iteration at each arm's best learning rate, mean +- standard error over {units} "
             f"{unit}s ({runs} runs per arm)", "", f"| iteration | {header} |", "|---|" + "---|" * len(curves)]
    for i in range(iterations):
        cells = [cell(clustered({key: curve[i] for key, curve in per_seed.items() if i < len(curve)}))
                 if any(i < len(curve) for curve in per_seed.values()) else "" for per_seed in curves.values()]
        lines.append(f"| {i if i else '0 (pi_0)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_table(finals: dict[str, dict[tuple[int, int], dict[str, float]]]) -> str:
    lines = ["after the last iteration, at each arm's best learning rate", "",
             "| metric | " + " | ".join(finals) + " |", "|---|" + "---|" * len(finals)]
    for key in DIAGNOSTICS:
        cells = [cell(clustered({seeds: metrics[key] for seeds, metrics in per_seed.items()}))
                 for per_seed in finals.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap(online: dict[tuple[int, int], float], offline: dict[tuple[int, int], float]) -> tuple[float, float]:
    """One arm's final gold minus another's, paired by (asset seed, run seed), with the clustered standard error."""
    return clustered({seeds: online[seeds] - offline[seeds] for seeds in online.keys() & offline.keys()})


def verdict(curves: dict[str, dict[tuple[int, int], list[float]]], label: str = "each arm at its best rate",
            unit: str = "asset seed") -> str:
    """Online against offline (and semi-online against offline, when it ran); whether online gold rises every
    iteration."""
    finals = {name: {seeds: curve[-1] for seeds, curve in per_seed.items()} for name, per_seed in curves.items()}
    lines = [f"{label}: final gold " + ", ".join(f"{name} {cell(clustered(values))}" for name, values in finals.items())]
    for name in (arm for arm in ("online", "semi_online") if arm in finals and "offline" in finals):
        difference, difference_se = gap(finals[name], finals["offline"])
        if math.isnan(difference_se):  # one unit: nothing to measure the spread by
            lines.append(f"{name} - offline = {difference:.3f} on one {unit}: no standard error, no verdict")
            continue
        standard_errors = difference / difference_se if difference_se > 0 else float("inf")
        lines.append(f"{name} - offline = {difference:.3f} +- {difference_se:.3f} ({standard_errors:.1f} standard "
                     f"errors): {name + ' wins' if standard_errors > WIN_STANDARD_ERRORS else 'no clear winner'}")
    if "online" in curves:
        online_curve = curves["online"].values()
        per_iteration = [statistics.fmean(curve[i] for curve in online_curve)
                         for i in range(len(next(iter(online_curve))))]
        rising = all(b > a for a, b in zip(per_iteration, per_iteration[1:]))
        lines.append(f"online gold rises every iteration: {'yes' if rising else 'no'}")
    return "\n".join(lines)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def pi_0_best_of_k(offline_dir: Path) -> dict[int, float]:
    """pi_0's best gold of K on each prompt of the round, by prompt index: the offline arm samples all its pairs from
    pi_0, on the prompts every arm of the same asset and run seed takes (the online iterations take them in slices)."""
    from rlhf_loop.toy.task import gold_reward

    best = {}
    for shard in sorted((offline_dir / "iter_001" / "rollouts").glob("shard_*.jsonl")):
        for rollout in read_jsonl(shard):
            prompt = rollout["prompt"]
            best[prompt["index"]] = max(gold_reward(prompt["messages"], response["text"], prompt["meta"])
                                        for response in rollout["responses"])
    return best


def chosen_above_pi_0(run_dir: Path, best: dict[int, float], meta: dict[int, dict]) -> list[float]:
    """The mechanism: the share of a run's pairs whose chosen answer scores (gold) above pi_0's best of K on its
    prompt, in each third of the pair budget (the online arm's iterations 1-3; the semi-online arm's round by its
    sync blocks; offline's is 0 by construction: its chosen answers are pi_0's own)."""
    from rlhf_loop.toy.task import gold_reward

    third = math.ceil(len(best) / ONLINE_ITERATIONS)
    above: list[list[bool]] = [[] for _ in range(ONLINE_ITERATIONS)]
    for pairs in sorted(run_dir.glob("iter_*/pairs.jsonl")):
        for pair in read_jsonl(pairs):
            index = pair["prompt_index"]
            gold = gold_reward(pair["prompt_messages"], pair["chosen"]["text"], meta[index])
            above[index // third].append(gold > best[index])
    return [statistics.fmean(flags) if flags else float("nan") for flags in above]


def prompt_meta(offline_dir: Path) -> dict[int, dict]:
    return {rollout["prompt"]["index"]: rollout["prompt"]["meta"]
            for shard in sorted((offline_dir / "iter_001" / "rollouts").glob("shard_*.jsonl"))
            for rollout in read_jsonl(shard)}


def mechanism_table(shares: dict[str, dict[tuple[int, int], list[float]]], unit: str = "asset seed") -> str:
    lines = ["share of pairs whose chosen answer scores above pi_0's best of K (gold) on its prompt, by third of the "
             f"pair budget (online: its iteration), mean +- standard error over {unit}s", "",
             "| third of the pairs | " + " | ".join(shares) + " |", "|---|" + "---|" * len(shares)]
    for third in range(ONLINE_ITERATIONS):
        cells = [cell(clustered({seeds: values[third] for seeds, values in per_seed.items()}))
                 for per_seed in shares.values()]
        lines.append(f"| {third + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, dict[tuple[int, int], list[float]]], rates: dict[str, float], title: str,
                path: Path) -> None:
    """Gold per iteration, each arm at its best rate: the mean over the units with standard-error bars (the
    one-round arms are a line from pi_0 to their end, drawn over the same three thirds of the pair budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, per_seed in curves.items():
        length = max(len(curve) for curve in per_seed.values())
        points = [clustered({seeds: curve[i] for seeds, curve in per_seed.items()}) for i in range(length)]
        xs = [0, ONLINE_ITERATIONS] if length == 2 else list(range(length))
        axes.errorbar(xs, [m for m, _ in points], yerr=[0 if math.isnan(se) else se for _, se in points],
                      marker="o", capsize=3, label=f"{name} (lr {rates[name]:g})")
    axes.set_xticks(range(ONLINE_ITERATIONS + 1))
    axes.set_xlabel("pairs trained on (thirds of the budget; online: iterations)")
    axes.set_ylabel("held-out gold (eval/gold_mean)")
    axes.set_title(f"{title}: each arm at its best learning rate")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_all(arms: list[Arm], runs_dir: Path, jobs: int) -> dict[Arm, Path]:
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(zip(arms, pool.map(lambda arm: run(arm, runs_dir), arms)))


def arm_overrides(args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    """What each arm runs with besides its config: the smoke's sizes (the one-round arms get the prompts of all the
    online iterations together, so every arm has the same pair budget) and the semi-online sync interval."""
    prompts = SMOKE["prompts"] if args.smoke else None
    sync_every = args.sync_every or (SMOKE["sync_every"] if args.smoke else None)
    common = tuple(SMOKE["eval"]) if args.smoke else ()
    round_prompts = (f"data.prompts_per_iteration={prompts * ONLINE_ITERATIONS}",) if prompts else ()
    return {"offline": common + round_prompts,
            "semi_online": common + round_prompts + ((f"train.sync_every_steps={sync_every}",) if sync_every else ()),
            "online": common + ((f"data.prompts_per_iteration={prompts}",) if prompts else ())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="toy", help="smollm2: the real model")
    parser.add_argument("--task", choices=TASKS, default="short_lists", help="toy_task.variant (the toy model only)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--asset-seeds", type=int, nargs="+", default=[0, 1, 2], help="the toy model only")
    parser.add_argument("--run-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-4, 2e-4, 4e-4, 8e-4])
    parser.add_argument("--sync-every", type=int, help="semi_online's train.sync_every_steps (default: its config's)")
    parser.add_argument("--runs-dir", type=Path, help="default: runs/compare (runs/compare-smoke with --smoke)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each starts its own local Ray)")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    parser.add_argument("--plot", type=Path, help="draw the gold curves at each arm's best rate to this PNG")
    parser.add_argument("--smoke", action="store_true", help="a few minutes' check that every arm runs; no result")
    args = parser.parse_args()
    if len(args.learning_rates) < 3 and not args.smoke:
        parser.error("--learning-rates needs at least 3 values: each arm is compared at its best of a real sweep")
    if args.model != "toy" and args.task != "short_lists":
        parser.error(f"--task {args.task} is a toy task's variant; --model {args.model} runs its own config's prompts")
    model = MODELS[args.model]
    asset_seeds = args.asset_seeds if args.model == "toy" else [0]
    runs_dir = args.runs_dir or REPO / "runs" / ("compare-smoke" if args.smoke else "compare")
    extra = arm_overrides(args)

    def arm(name: str, rate: float, asset: int, seed: int) -> Arm:
        return Arm(name, rate, asset, seed, args.task, extra[name], args.model)

    sweep = [arm(name, rate, asset, args.run_seeds[0])
             for rate in args.learning_rates for asset in asset_seeds for name in args.arms]
    sweep_dirs = run_all(sweep, runs_dir, args.jobs)
    sweep_finals = {name: {rate: {a.key: gold_curve(path)[-1]
                                  for a, path in sweep_dirs.items() if a.name == name and a.learning_rate == rate}
                           for rate in args.learning_rates} for name in args.arms}
    rates = {name: best_rate(per_rate) for name, per_rate in sweep_finals.items()}

    final = [arm(name, rates[name], asset, seed) for asset in asset_seeds for seed in args.run_seeds
             for name in args.arms]
    final_dirs = run_all(final, runs_dir, args.jobs)
    curves = {name: {a.key: gold_curve(p) for a, p in final_dirs.items() if a.name == name}
              for name in args.arms}
    finals = {name: {a.key: final_metrics(p) for a, p in final_dirs.items() if a.name == name}
              for name in args.arms}
    if args.smoke:
        print("SMOKE RUN: tiny sizes, to show that every arm runs; these numbers are not a result\n")
    title = f"toy task {args.task}" if args.model == "toy" else f"{args.model} on the list requests"
    tables = [title, sweep_table(sweep_finals, model.unit), curve_table(curves, rates, model.unit),
              diagnostics_table(finals)]
    shares = {}
    if "offline" in args.arms:  # pi_0's best of K per prompt comes from the offline arm's rollouts
        offline = {a.key: p for a, p in final_dirs.items() if a.name == "offline"}
        shares = {name: {a.key: chosen_above_pi_0(
            p, pi_0_best_of_k(offline[a.key]), prompt_meta(offline[a.key]))
            for a, p in final_dirs.items() if a.name == name} for name in args.arms}
        tables.append(mechanism_table(shares, model.unit))
    print(*tables, verdict(curves, unit=model.unit), sep="\n\n")
    if args.plot:
        plot_curves(curves, rates, title, args.plot)
        print(f"\ncurves: {args.plot}")
    shipped = model.shipped_learning_rate
    if shipped in args.learning_rates:
        shared = {name: {a.key: gold_curve(p) for a, p in sweep_dirs.items()
                         if a.name == name and a.learning_rate == shipped} for name in args.arms}
        note = verdict(shared, f"note: every arm at the demo's rate {shipped:g}", model.unit).splitlines()
        print("\n" + "\n".join(line for line in note if "rises every iteration" not in line))
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model,
            "task": args.task,
            "smoke": args.smoke,
            "best_learning_rates": rates,
            "sweep": {name: {f"{rate:g}": {f"{a}/{s}": v for (a, s), v in per_seeds.items()}
                             for rate, per_seeds in per_rate.items()} for name, per_rate in sweep_finals.items()},
            "curves": {name: {f"{a}/{s}": curve for (a, s), curve in per_seed.items()}
                       for name, per_seed in curves.items()},
            "chosen_above_pi_0_best_of_k": {name: {f"{a}/{s}": values for (a, s), values in per_seed.items()}
                                            for name, per_seed in shares.items()},
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
