"""Start-up with warm actors (cluster.keep_warm): launch to every actor ready, for runs on a Ray head this script starts.

    PYTHONPATH=. python scripts/bench_warm_startup.py [--repeats 3] [--out warm_startup.json]

On a head of `ray start` on loopback (its own process group and temp directory, stopped at the end), the toy config
(configs/tiny.yaml, one iteration of 64 prompts, no evaluation: start-up does not depend on the work) runs: once
without keep_warm (the comparison: every actor new, on the same joined cluster), once with it (it starts the warm
actors), then `--repeats` times with it (each takes them over; its learner is new). Each run's number is its own log
line "every actor ready X s after launch" (rlhf_loop/cluster/roles.py), counted from the process's start. Then
`rlhf-loop cluster release` stops the warm actors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"start-up: (.*); every actor ready ([0-9.]+) s after launch")


def start_head(root: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", f"--temp-dir={root}", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return head
        except OSError:
            if time.monotonic() > deadline or head.poll() is not None:
                raise SystemExit("the Ray head did not start")
            time.sleep(0.5)


def timed_run(name: str, overrides: list[str], runs: Path, env: dict[str, str]) -> dict:
    run_dir = runs / name
    result = subprocess.run([sys.executable, "-m", "rlhf_loop.frontend.cli", "run", "configs/tiny.yaml", *overrides,
                             "--run-dir", str(run_dir)], cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    found = READY.search((run_dir / "logs" / "driver.log").read_text())
    row = {"run": name, "ready_s": float(found.group(2)), "roles": found.group(1)}
    print(f"{name:12s} every actor ready {row['ready_s']:5.1f} s after launch ({row['roles']})", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs that take the warm actors over")
    parser.add_argument("--toy-dir", default=".cache/toy_task", help="the toy task's assets (built when missing)")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()

    from rlhf_loop.common.network import free_port
    from rlhf_loop.toy.assets import ToyTaskConfig, ensure_toy_assets

    toy_dir = str(Path(args.toy_dir).resolve())
    ensure_toy_assets(ToyTaskConfig(enabled=True, dir=toy_dir))  # before any timed run: a build would count in it
    root = Path(tempfile.mkdtemp(prefix="rlw_", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    port = free_port("127.0.0.1")
    head = start_head(root / "ray", port, env)
    common = ["iterations=1", "data.prompts_per_iteration=64", "eval.prompts=null", f"toy_task.dir={toy_dir}",
              f"cluster.address=127.0.0.1:{port}", "cluster.threads_per_actor=2"]  # every core, as a local cluster
    try:
        rows = [timed_run("without", common, root / "runs", env),
                timed_run("warm-first", [*common, "cluster.keep_warm=true"], root / "runs", env)]
        rows += [timed_run(f"warm-kept-{i}", [*common, "cluster.keep_warm=true"], root / "runs", env)
                 for i in range(1, args.repeats + 1)]
        subprocess.run([sys.executable, "-m", "rlhf_loop.frontend.cli", "cluster", "release", "--address",
                        f"127.0.0.1:{port}"], cwd=REPO, env=env, check=True)
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(root, ignore_errors=True)
    kept = [row["ready_s"] for row in rows if row["run"].startswith("warm-kept")]
    print(f"kept warm: median {statistics.median(kept):.1f} s over {len(kept)} run(s); without keep_warm "
          f"{rows[0]['ready_s']:.1f} s; the run that started the warm actors {rows[1]['ready_s']:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": rows, "kept_median_s": statistics.median(kept)}, indent=2))


if __name__ == "__main__":
    main()
