"""The same online DPO work through rlhf-loop, TRL's OnlineDPOTrainer and a stage-per-process chain, side by side.

    PYTHONPATH=. python scripts/bench.py [--repeats 3] [--settings equal,demo] [--systems rlhf-loop,trl,chain]
                                         [--device cpu|cuda] [--out bench_out] [--scaling]

Each system runs as its own process tree (a fresh process per repeat), measured from launch to exit; its own
records give the work-only wall and the stage times. Prints one markdown table (the median of the repeats) and
writes OUT/bench.json (every repeat and the medians). `--scaling` instead measures rlhf-loop's iteration time at
four prompts x K sizes and plots it (OUT/scaling.json, --plot). docs/performance.md has the measured numbers.
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
    merged = {"system": rows[0]["system"], "setting": rows[0]["setting"], "repeats": len(rows),
              "notes": rows[0]["notes"]}
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
    header = ("| setting | system | whole process s | work only s | generate s | score s | train s | sync s | "
              "eval s | gen tokens/s | scores/s | pairs/s | loop overhead | start-up per role s | peak RSS MB "
              "(PSS) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for m in medians:
        startup = ", ".join(f"{role} {seconds:.1f}" for role, seconds in m["startup_s"].items())
        overhead = f"{cell(m['overhead_s'], 2)} s ({cell(m['overhead_pct'])}%)"
        lines.append(
            f"| {m['setting']} | {m['system']} | {cell(m['whole_s'])} | {cell(m['work_s'])} | "
            f"{cell(m['generate_s'], 2)} | {cell(m['score_s'], 2)} | {cell(m['train_s'], 2)} | "
            f"{cell(m['sync_s'], 3)} | {cell(m['eval_s'], 2)} | {cell(m['gen_tokens_per_s'], 0)} | "
            f"{cell(m['scores_per_s'], 0)} | {cell(m['pairs_per_s'], 1)} | {overhead} | {startup} | "
            f"{cell(m['peak_rss_mb'], 0)} ({cell(m['peak_pss_mb'], 0)}) |")
    return "\n".join(lines)


def ratios(medians: list[dict]) -> list[str]:
    """rlhf-loop against each other system: how many times faster, whole process and work alone."""
    lines = []
    by_key = {(m["setting"], m["system"]): m for m in medians}
    for (setting, system), other in by_key.items():
        ours = by_key.get((setting, "rlhf-loop"))
        if system == "rlhf-loop" or ours is None:
            continue
        lines.append(f"- {setting}: rlhf-loop is {other['whole_s'] / ours['whole_s']:.2f}x {system} for the whole "
                     f"process and {other['work_s'] / ours['work_s']:.2f}x for the work alone")
    return lines


def compare(args, assets) -> None:
    """Repeats interleave the systems (repeat 1 of each, then repeat 2 ...), so a change in the machine's load
    reaches every system alike. A failed run is recorded and the others go on."""
    results = {"command": " ".join(sys.argv), "device": args.device, "threads": args.threads, "repeats": {},
               "failures": [], "medians": []}
    for setting_name in args.settings:
        setting = SETTINGS[setting_name]
        for repeat in range(args.repeats):
            for system in args.systems:
                began = time.perf_counter()
                work_dir = args.out / setting_name / system / f"repeat_{repeat}"
                try:
                    measured = run_system(system, setting, assets, args.device, work_dir, args.threads)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    results["failures"].append(f"{setting_name} {system} repeat {repeat + 1}: {e}")
                    print(results["failures"][-1], flush=True)
                    continue
                load = os.getloadavg()  # the machine's load while it ran (other people's jobs included)
                results["repeats"].setdefault(f"{setting_name}/{system}", []).append(
                    {**measured, "repeat": repeat, "loadavg_1m": load[0], "loadavg_5m": load[1]})
                print(f"{setting_name} {system} repeat {repeat + 1}/{args.repeats}: whole "
                      f"{measured['whole_s']:.1f} s, work {measured['work_s']:.1f} s "
                      f"({time.perf_counter() - began:.0f} s)", flush=True)
                write_json(args.out / "bench.json", results)
        for system in args.systems:
            rows = results["repeats"].get(f"{setting_name}/{system}")
            if rows:
                results["medians"].append(median_row(rows))
        write_json(args.out / "bench.json", results)
    report(results)


def report(results: dict) -> None:
    print()
    print(table(results["medians"]))
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
        setting_name, system = key.split("/")
        if system != "rlhf-loop":
            continue
        for index, old in enumerate(rows):
            run_dir = args.out / setting_name / system / f"repeat_{old.get('repeat', index)}" / "run"
            measured = Measured(old["whole_s"], old["peak_rss_mb"], old["peak_pss_mb"], old["returncode"])
            rows[index] = {**rlhf_loop_row(SETTINGS[setting_name], run_dir, measured), "repeat": index}
    results["medians"] = [median_row(rows) for rows in results["repeats"].values()]
    write_json(args.out / "bench.json", results)
    report(results)


def scaling(args, assets) -> None:
    from bench_plot import plot_scaling

    points = []
    for prompts, samples in SCALING:
        setting = scaled(prompts, samples)
        rows = [run_system("rlhf-loop", setting, assets, args.device, args.out / "scaling" / setting.name / f"r{i}")
                for i in range(args.repeats)]
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
    parser.add_argument("--settings", default="equal,demo", help=f"comma-separated, of {sorted(SETTINGS)}")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {list(SYSTEMS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda on a GPU machine: every system puts its models there (vLLM, HF generate, DPO)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of TRL's and the chain's processes, as Ray gives rlhf-loop's actors (1); "
                             "0 leaves the library default (every core), which collapses when the CPU is shared")
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
    for name, known in ((args.settings, SETTINGS), (args.systems, SYSTEMS)):
        unknown = [n for n in name if n not in known]
        if unknown:
            parser.error(f"unknown {unknown}; choose from {list(known)}")
    if args.reread:
        return reread(args)
    args.out.mkdir(parents=True, exist_ok=True)
    assets = prepare_assets(args.cache)
    print(f"benchmark policy: {parameter_count(assets.bench_policy):,} parameters; demo policy: "
          f"{parameter_count(assets.toy_dir / 'sft_policy'):,}", flush=True)
    scaling(args, assets) if args.scaling else compare(args, assets)


if __name__ == "__main__":
    main()
