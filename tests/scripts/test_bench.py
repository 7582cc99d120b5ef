"""The benchmark's arithmetic and process measuring (scripts/bench*.py), without running any system."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))  # the bench scripts import each other as the script directory allows

import bench  # noqa: E402
import bench_common  # noqa: E402
import bench_plot  # noqa: E402
import bench_systems  # noqa: E402


def fake_row(system: str, whole: float, work: float, startup: float = 10.0, threads: int = 1,
             tokens: float = 1000.0) -> dict:
    measured = bench_common.Measured(wall_s=whole, peak_rss_mb=1000.0, peak_pss_mb=800.0, returncode=0)
    stages = {"generate_s": work * 0.5, "score_s": work * 0.1, "train_s": work * 0.3, "sync_s": 0.01, "eval_s": None}
    return {**bench_systems.row(system, bench_common.SETTINGS["equal"], measured, work, stages, tokens=tokens,
                                scores=256, pairs=128, startup={"role": startup}, notes=["a note"]),
            "threads": threads}


def test_loop_overhead_is_work_outside_the_timed_stages():
    r = fake_row("rlhf-loop", whole=60.0, work=10.0)
    assert r["overhead_s"] == pytest.approx(10.0 - 9.01)
    assert r["overhead_pct"] == pytest.approx(100 * 0.99 / 10.0)
    assert r["gen_tokens_per_s"] == pytest.approx(1000.0 / 5.0)
    assert r["pairs_per_s"] == pytest.approx(128 / 3.0)


def test_median_over_repeats_and_the_ratios_take_each_system_at_its_best_thread_count():
    ours = bench.median_row([fake_row("rlhf-loop", 50, 10, 5), fake_row("rlhf-loop", 70, 12, 9),
                             fake_row("rlhf-loop", 60, 30, 7)])
    assert (ours["whole_s"], ours["work_s"], ours["startup_s"]["role"], ours["repeats"]) == (60, 12, 7, 3)
    assert ours["threads"] == 1
    trl_one_thread = bench.median_row([fake_row("trl", 240, 48)])
    # at 2 threads TRL starts faster but works slower: each measure takes its own best
    trl_two_threads = bench.median_row([fake_row("trl", 120, 96, threads=2)])
    lines = bench.ratios([ours, trl_one_thread, trl_two_threads])
    assert lines == ["- equal: rlhf-loop is 2.00x trl for the whole process (60.0 s at 1 threads against 120.0 s at "
                     "2) and 4.00x for the work alone (12.0 s at 1 against 48.0 s at 1)"]
    table = bench.table([ours, trl_one_thread, trl_two_threads]).splitlines()
    assert len(table) == 5 and all(line.count("|") == table[0].count("|") for line in table)
    assert "| equal | trl | 2 | 120.0 | 96.0 |" in table[4]


def test_the_rollout_meter_compares_generation_rates_at_each_best():
    ours = bench.median_row([fake_row("rlhf-loop", 60, 10, tokens=950.0)])  # generate 5 s: 190 tokens/s
    direct_one = bench.median_row([fake_row("vllm", 20, 4, tokens=1000.0)])  # generate 2 s: 500 tokens/s
    direct_two = bench.median_row([fake_row("vllm", 20, 2, threads=2, tokens=1000.0)])  # 1 s: 1,000 tokens/s
    [line] = bench.ratios([ours, direct_one, direct_two])
    assert line.startswith("- equal: rlhf-loop's rollout stage generates at 0.19x the rate of vLLM driven directly")
    assert "1,000 tokens/s at 2" in line


def test_linear_fit_and_verdict(tmp_path):
    slope, intercept, r2 = bench_plot.linear_fit([1, 2, 3, 4], [3, 5, 7, 9])
    assert (slope, intercept, r2) == pytest.approx((2.0, 1.0, 1.0))
    points = [{"prompts": p, "samples_per_prompt": k, "responses": p * k, "work_s": 2 + 0.01 * p * k,
               "generate_s": 0.006 * p * k, "score_s": 0.001 * p * k, "train_s": 0.002 * p * k, "sync_s": 0.1}
              for p, k in bench_common.SCALING]
    verdict = bench_plot.plot_scaling(points, tmp_path / "scaling.png")
    assert verdict["about_linear"] and (tmp_path / "scaling.png").stat().st_size > 0
    points[-1]["work_s"] *= 3  # a knee at the largest size
    assert not bench_plot.plot_scaling(points, tmp_path / "knee.png")["about_linear"]


def test_a_gpu_config_shares_one_gpu_between_the_roles():
    assets = bench_common.Assets(Path("/toy"), Path("/policy"), None)
    config = bench_systems.rlhf_loop_config(bench_common.SETTINGS["equal"], assets, "cuda")
    assert config["device"] == "cuda"
    shares = config["rollout"]["gpus_per_engine"] + config["train"]["gpus_per_worker"] + config["reward"]["num_gpus"]
    assert shares <= 1.0
    cpu = bench_systems.rlhf_loop_config(bench_common.SETTINGS["demo"], assets, "cpu")
    assert "gpus_per_engine" not in cpu["rollout"] and cpu["eval"]["samples_per_prompt"] == 8
    assert (cpu["rollout"]["samples_per_prompt"], cpu["data"]["prompts_per_iteration"]) == (8, 512)


def test_a_process_tree_is_measured_and_killed_whole(tmp_path):
    """A child that leaves a sleeping grandchild behind: its memory counts, and the grandchild dies with the run."""
    pid_file = tmp_path / "grandchild.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(1.5)")
    measured = bench_common.run_measured([sys.executable, "-c", script], tmp_path / "log.txt")
    assert measured.returncode == 0 and 1.5 <= measured.wall_s < 30
    assert measured.peak_rss_mb > 5 and 0 < measured.peak_pss_mb <= measured.peak_rss_mb
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(grandchild)], capture_output=True, text=True).stdout
    assert state.strip() == "" or state.startswith("Z")  # gone, or a zombie (ZN when the tests run niced)


def test_results_are_written_as_json(tmp_path):
    bench_common.write_json(tmp_path / "out.json", {"path": Path("/x"), "setting": bench_common.SETTINGS["equal"],
                                                     "nan": math.nan})
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["path"] == "/x" and written["setting"]["prompts_per_iteration"] == 128


def test_rlhf_loop_work_is_the_driver_log_from_actors_ready_to_the_last_iteration(tmp_path):
    log = tmp_path / "driver.log"
    log.write_text("2026-11-30 14:49:18,320 INFO rlhf_loop: run directory x\n"
                   "2026-11-30 14:49:45,098 INFO rlhf_loop.cluster.roles: start-up: rollout 20.7 s, reward 12.6 s\n"
                   "2026-11-30 14:50:05,851 INFO rlhf_loop: iter 1/2  reward -4.81  pairs 128/128  16.3 s\n"
                   "2026-11-30 14:50:30,000 INFO rlhf_loop: iter 2/2  reward -4.00  pairs 128/128  20.0 s\n"
                   "2026-11-30 14:50:31,500 INFO rlhf_loop: finished; `rlhf-loop report x` writes its HTML report\n")
    assert bench_systems.driver_log_work_seconds(log) == pytest.approx(44.902, abs=1e-3)
