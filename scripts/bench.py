"""The same online DPO work through rlhf-loop, TRL's OnlineDPOTrainer and a stage-per-process chain, side by side.

    PYTHONPATH=. python scripts/bench.py [--repeats 3] [--settings equal,real] [--systems rlhf-loop,trl,chain]
                                         [--threads 1,2] [--device cpu|cuda] [--out bench_out] [--scaling]

Each system runs as its own process tree (a fresh process per repeat), measured from launch to exit; its own
records give the work-only wall and the stage times. Every system runs at each torch thread count of --threads
(default: 1 and the machine's cores), so that each is compared at its own best: the table shows every row, then each
system's best (its fastest median, whole process and work alone taken separately), and the ratios are best against
best. Writes OUT/bench.json (every repeat and the medians). `--scaling` instead measures rlhf-loop's iteration time
at four prompts x K sizes and plots it (OUT/scaling.json, --plot). docs/performance.md has the measured numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import REPO, SCALING, SETTINGS, Measured, parameter_count, prepare_assets, scaled, write_json
from bench_systems import SYSTEMS, rlhf_loop_row, run_system

NUMBER_KEYS = ("whole_s", "work_s", "recorded_iteration_s", "generate_s", "score_s", "train_s", "sync_s", "eval_s", "gen_tokens_per_s",
               "scores_per_s", "pairs_per_s", "overhead_s", "overhead_pct", "peak_rss_mb", "peak_pss_mb", "tokens",
               "scores", "pairs")


def median_row(rows: list[dict]) -> dict:
    """The median of every number over the repeats (start-up per role too); notes from the first repeat."""
    merged = {"system": rows[0]["system"], "setting": rows[0]["setting"], "threads": rows[0].get("threads"),
              "repeats": len(rows), "notes": rows[0]["notes"]}
    for key in NUMBER_KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        merged[key] = statistics.median(values) if values else None
    roles = rows[0]["startup_s"].keys()
    merged["startup_s"] = {role: statistics.median(r["startup_s"][role] for r in rows) for role in roles}
    return merged


def cell(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def table(medians: list[dict]) -> str:
    header = ("| setting | system | threads | whole process s | work only s | generate s | score s | train s | sync s | "
              "eval s | gen tokens/s | scores/s | pairs/s | loop overhead | start-up per role s | peak RSS MB "
              "(PSS) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for m in medians:
        startup = ", ".join(f"{role} {seconds:.1f}" for role, seconds in m["startup_s"].items())
        overhead = f"{cell(m['overhead_s'], 2)} s ({cell(m['overhead_pct'])}%)"
        lines.append(
            f"| {m['setting']} | {m['system']} | {m.get('threads') or '-'} | {cell(m['whole_s'])} | {cell(m['work_s'])} | "
            f"{cell(m['generate_s'], 2)} | {cell(m['score_s'], 2)} | {cell(m['train_s'], 2)} | "
            f"{cell(m['sync_s'], 3)} | {cell(m['eval_s'], 2)} | {cell(m['gen_tokens_per_s'], 0)} | "
            f"{cell(m['scores_per_s'], 0)} | {cell(m['pairs_per_s'], 1)} | {overhead} | {startup} | "
            f"{cell(m['peak_rss_mb'], 0)} ({cell(m['peak_pss_mb'], 0)}) |")
    return "\n".join(lines)


def best_of(medians: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """Per (setting, system): its fastest median over the thread counts, for the whole process and for the work
    alone separately (a system may start faster at one count and work faster at another)."""
    best: dict[tuple[str, str], dict[str, dict]] = {}
    for m in medians:
        entry = best.setdefault((m["setting"], m["system"]), {})
        for key in ("whole_s", "work_s"):
            if m.get(key) is not None and (key not in entry or m[key] < entry[key][key]):
                entry[key] = m
    return best


def ratios(medians: list[dict]) -> list[str]:
    """rlhf-loop against each other system, each at its own best thread count: how many times faster, whole process
    and work alone."""
    lines = []
    best = best_of(medians)
    for (setting, system), other in best.items():
        ours = best.get((setting, "rlhf-loop"))
        if system == "rlhf-loop" or ours is None:
            continue
        if system == "vllm":
            lines.append(rollout_meter(setting, [m for m in medians if m["setting"] == setting]))
            continue
        lines.append(
            f"- {setting}: rlhf-loop is {other['whole_s']['whole_s'] / ours['whole_s']['whole_s']:.2f}x {system} for "
            f"the whole process ({ours['whole_s']['whole_s']:.1f} s at {ours['whole_s']['threads']} threads against "
            f"{other['whole_s']['whole_s']:.1f} s at {other['whole_s']['threads']}) and "
            f"{other['work_s']['work_s'] / ours['work_s']['work_s']:.2f}x for the work alone "
            f"({ours['work_s']['work_s']:.1f} s at {ours['work_s']['threads']} against {other['work_s']['work_s']:.1f} s "
            f"at {other['work_s']['threads']})")
    return lines


def rollout_meter(setting: str, medians: list[dict]) -> str:
    """rlhf-loop's rollout stage (its generate time inside a run) against vLLM driven directly, each at its best
    thread count: generated tokens per second, and the tokens each made (equal when the work is the same)."""
    def fastest(system: str) -> dict:
        return max((m for m in medians if m["system"] == system and m["gen_tokens_per_s"]),
                   key=lambda m: m["gen_tokens_per_s"])

    ours, direct = fastest("rlhf-loop"), fastest("vllm")
    return (f"- {setting}: rlhf-loop's rollout stage generates at {ours['gen_tokens_per_s'] / direct['gen_tokens_per_s']:.2f}x "
            f"the rate of vLLM driven directly ({ours['gen_tokens_per_s']:,.0f} tokens/s at {ours['threads']} threads, "
            f"{ours['tokens']:,.0f} tokens, against {direct['gen_tokens_per_s']:,.0f} tokens/s at {direct['threads']}, "
            f"{direct['tokens']:,.0f} tokens)")


def compare(args, assets) -> None:
    """Repeats interleave the systems and thread counts (repeat 1 of each, then repeat 2 ...), so a change in the
    machine's load reaches every one alike. A failed run is recorded and the others go on."""
    results = {"command": " ".join(sys.argv), "device": args.device, "threads": args.threads, "repeats": {},
               "failures": [], "medians": []}
    for setting_name in args.settings:
        setting = SETTINGS[setting_name]
        for repeat in range(args.repeats):
            for system in args.systems:
                for threads in args.threads:
                    name = f"{setting_name}/{system}/{threads}"
                    began = time.perf_counter()
                    work_dir = args.out / setting_name / system / f"threads_{threads}" / f"repeat_{repeat}"
                    try:
                        measured = run_system(system, setting, assets, args.device, work_dir, threads)
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        results["failures"].append(f"{name} repeat {repeat + 1}: {e}")
                        print(results["failures"][-1], flush=True)
                        continue
                    load = os.getloadavg()  # the machine's load while it ran (other people's jobs included)
                    results["repeats"].setdefault(name, []).append(
                        {**measured, "threads": threads, "repeat": repeat, "loadavg_1m": load[0],
                         "loadavg_5m": load[1]})
                    print(f"{setting_name} {system} at {threads} threads, repeat {repeat + 1}/{args.repeats}: whole "
                          f"{measured['whole_s']:.1f} s, work {measured['work_s']:.1f} s "
                          f"({time.perf_counter() - began:.0f} s)", flush=True)
                    write_json(args.out / "bench.json", results)
        for system in args.systems:
            for threads in args.threads:
                rows = results["repeats"].get(f"{setting_name}/{system}/{threads}")
                if rows:
                    results["medians"].append(median_row(rows))
        write_json(args.out / "bench.json", results)
    report(results)


def report(results: dict) -> None:
    print()
    print(table(results["medians"]))
    print()
    print("Each system at its best (fastest median over the thread counts):")
    print()
    print(table(sorted({id(m): m for entry in best_of(results["medians"]).values() for m in entry.values()}.values(),
                       key=lambda m: (m["setting"], m["system"], m["threads"]))))
    print()
    print("\n".join(ratios(results["medians"])))
    for m in results["medians"]:
        for note in m["notes"]:
            print(f"- {m['setting']} {m['system']}: {note}")


def reread(args) -> None:
    """Rebuild rlhf-loop's rows of OUT/bench.json from their run directories (what the process measured, wall and
    memory, stays), then the medians and the table: for a bench.json written before the work-only definition
    changed."""
    import json

    results = json.loads((args.out / "bench.json").read_text())
    for key, rows in results["repeats"].items():
        if key.count("/") != 2:
            raise SystemExit(f"{args.out / 'bench.json'} was written by a bench.py without thread counts (its key "
                             f"{key!r} has none); rerun the benchmark instead of --reread")
        setting_name, system, threads = key.split("/")
        if system != "rlhf-loop":
            continue
        for index, old in enumerate(rows):
            run_dir = (args.out / setting_name / system / f"threads_{threads}" / f"repeat_{old.get('repeat', index)}"
                       / "run")
            measured = Measured(old["whole_s"], old["peak_rss_mb"], old["peak_pss_mb"], old["returncode"])
            rows[index] = {**rlhf_loop_row(SETTINGS[setting_name], run_dir, measured), "threads": int(threads),
                           "repeat": index}
    results["medians"] = [median_row(rows) for rows in results["repeats"].values()]
    write_json(args.out / "bench.json", results)
    report(results)


def scaling(args, assets) -> None:
    from bench_plot import plot_scaling

    points = []
    for prompts, samples in SCALING:
        setting = scaled(prompts, samples)
        rows = [run_system("rlhf-loop", setting, assets, args.device, args.out / "scaling" / setting.name / f"r{i}",
                           args.threads[0]) for i in range(args.repeats)]
        load = os.getloadavg()
        point = {"prompts": prompts, "samples_per_prompt": samples, "responses": prompts * samples,
                 "loadavg_1m": load[0], "loadavg_5m": load[1], **median_row(rows)}
        points.append(point)
        print(f"{prompts} x {samples}: iteration {point['work_s']:.1f} s (generate {point['generate_s']:.1f}, "
              f"score {point['score_s']:.1f}, train {point['train_s']:.1f})", flush=True)
        write_json(args.out / "scaling.json", {"command": " ".join(sys.argv), "points": points})
    verdict = plot_scaling(points, args.plot)
    write_json(args.out / "scaling.json", {"command": " ".join(sys.argv), "points": points, "fit": verdict})
    print(verdict["summary"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per system and setting; the median is shown")
    parser.add_argument("--settings", default="equal,real", help=f"comma-separated, of {sorted(SETTINGS)}")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {list(SYSTEMS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda on a GPU machine: every system puts its models there (vLLM, HF generate, DPO)")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}",
                        help="comma-separated torch thread counts (OMP_NUM_THREADS of every system's processes, "
                             "rlhf-loop's actors included); every system runs at each (default: 1 and the machine's "
                             "cores; --scaling uses the first)")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out", help="work directories and the JSON results")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache",
                        help="where the toy task's assets and the benchmark policy are built once")
    parser.add_argument("--scaling", action="store_true", help="rlhf-loop's iteration time at four prompts x K")
    parser.add_argument("--reread", action="store_true",
                        help="recompute rlhf-loop's rows, medians and table of OUT/bench.json from its run directories")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "images" / "scaling.png")
    args = parser.parse_args()
    args.settings = [s for s in args.settings.split(",") if s]
    args.systems = [s for s in args.systems.split(",") if s]
    args.threads = [int(t) for t in args.threads.split(",") if t]
    if not args.threads or min(args.threads) < 1:
        parser.error(f"--threads {args.threads} must list counts of 1 or more, like 1,{os.cpu_count()}")
    for name, known in ((args.settings, SETTINGS), (args.systems, SYSTEMS)):
        unknown = [n for n in name if n not in known]
        if unknown:
            parser.error(f"unknown {unknown}; choose from {list(known)}")
    if args.reread:
        return reread(args)
    args.out.mkdir(parents=True, exist_ok=True)
    assets = prepare_assets(args.cache, [SETTINGS[name] for name in args.settings])
    print(f"benchmark policy: {parameter_count(assets.bench_policy):,} parameters; demo policy: "
          f"{parameter_count(assets.toy_dir / 'sft_policy'):,}", flush=True)
    scaling(args, assets) if args.scaling else compare(args, assets)


if __name__ == "__main__":
    main()
