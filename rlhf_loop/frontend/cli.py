"""`rlhf-loop`: run, resume and inspect online iterative DPO runs.

    rlhf-loop run CONFIG [key=value ...] [--run-dir DIR] [--overwrite] [--verbose]
    rlhf-loop resume RUN_DIR [iterations=N ...] [--verbose]
    rlhf-loop status RUN_DIR [--json | --watch [--interval S]]
    rlhf-loop plan CONFIG [key=value ...]
    rlhf-loop export RUN_DIR --iteration N --to DIR
    rlhf-loop report RUN_DIR
    rlhf-loop serve-reward CONFIG [key=value ...] [--host H] [--port P] [--replicas N] [--token T]
    rlhf-loop cluster release [--address ADDR]

`key=value` overrides may come anywhere on the line. `run` and `resume` keep the console to progress bars and one
line per iteration; the libraries' output goes to RUN_DIR/logs/ (--verbose shows it on the console instead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

from rlhf_loop.common.console import quiet, say
from rlhf_loop.common.errors import UserError
from rlhf_loop.frontend.resume import SAFE_ON_RESUME


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        return args.command(args) or 0
    except UserError as e:
        print(f"rlhf-loop: error: {e}", file=sys.stderr)
        return 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command's arguments, with every word argparse does not know kept as a `key=value` override (so they may
    come before, between or after the options); an unknown --flag, or an override to a command without any, is one
    UserError line."""
    args, extra = _parser().parse_known_args(argv)
    flag = next((word for word in extra if word.startswith("-")), None)
    if flag is not None:
        raise UserError(f"unknown option {flag} for `rlhf-loop {args.name}`; `rlhf-loop {args.name} --help` lists "
                        f"its options")
    if extra and not args.takes_overrides:
        raise UserError(f"`rlhf-loop {args.name}` takes no key=value overrides, got {extra[0]!r}")
    args.overrides = extra
    return args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-loop", description="Online iterative DPO.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = _command(commands, "run", _run, "start a run from a config", "config overrides, e.g. iterations=2")
    run.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    run.add_argument("--run-dir", help="where the run writes everything (default: runs/CONFIG_NAME-TIMESTAMP)")
    run.add_argument("--overwrite", action="store_true", help="start afresh in an existing run directory")
    run.add_argument("--verbose", action="store_true", help="every library's output on the console, as it comes")

    resume = _command(commands, "resume", _resume, "continue a run from its first unfinished unit of work",
                      f"what a resume may change: {', '.join(SAFE_ON_RESUME)} (e.g. iterations=5 extends the run)")
    resume.add_argument("run_dir")
    resume.add_argument("--verbose", action="store_true", help="every library's output on the console, as it comes")

    status = _command(commands, "status", _status, "where a run stands: iteration, stage, shards done, last metrics")
    status.add_argument("run_dir")
    shown = status.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="machine-readable output")
    shown.add_argument("--watch", action="store_true", help="refresh in place until the run finishes (Ctrl-C: stop)")
    status.add_argument("--interval", type=float, default=5.0, metavar="S",
                        help="seconds between refreshes of --watch (default 5)")

    plan = _command(commands, "plan", _plan, "the resolved config, resources and memory per role, and checks",
                    "config overrides")
    plan.add_argument("config")

    export = _command(commands, "export", _export, "an iteration's policy (HF format) and its pairs (HF dataset)")
    export.add_argument("run_dir")
    export.add_argument("--iteration", type=int, required=True, help="which finished iteration")
    export.add_argument("--to", required=True, help="a new (or empty) directory")

    report = _command(commands, "report", _report,
                      "an HTML page with plots, metrics and sample pairs: RUN_DIR/report/")
    report.add_argument("run_dir", help="a finished, running or stopped run")

    serve = _command(commands, "serve-reward", _serve_reward, "serve the config's reward model over HTTP",
                     "overrides of reward.* keys")
    serve.add_argument("config", help="YAML with a reward: section (a run config works)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address; beyond loopback a --token is required")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--replicas", type=int, default=1, help="model copies serving requests in parallel")
    serve.add_argument("--token", default=None,
                       help="bearer token clients must send; prefer env RLHF_LOOP_REWARD_TOKEN (a flag shows in ps)")

    cluster = commands.add_parser("cluster", help="the warm actors kept on a Ray cluster (cluster.keep_warm)",
                                  description="the warm actors kept on a Ray cluster (cluster.keep_warm)")
    actions = cluster.add_subparsers(required=True, metavar="ACTION")
    release = _command(actions, "release", _cluster_release,
                       "stop the warm actors that no running job holds, and free their resources")
    release.set_defaults(name="cluster release")
    release.add_argument("--address", default="auto",
                         help="the Ray cluster's address, as cluster.address takes it (default: auto, the one here)")
    return parser


def _command(commands, name: str, function, description: str, overrides: str | None = None):
    """A subcommand; `overrides` (their help) when it takes key=value overrides, which parse_args collects."""
    parser = commands.add_parser(name, help=description, description=description + (
        f"; key=value anywhere on the line: {overrides}" if overrides else ""))
    parser.set_defaults(command=function, name=name, takes_overrides=overrides is not None)
    return parser


def _run(args) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from rlhf_loop.cluster.ray_cluster import ray_running, resolve_device
    from rlhf_loop.config import load_config, to_yaml
    from rlhf_loop.frontend.fingerprints import record_inputs
    from rlhf_loop.frontend.preflight import ensure_inputs, preflight
    from rlhf_loop.cluster.roles import launch_early
    from rlhf_loop.rundir.manifest import RunDir
    from rlhf_loop.common.files import atomic_write_text

    with quiet(args.verbose) as log:
        cfg = load_config(args.config, args.overrides)
        ensure_inputs(cfg)  # the toy task's models, built once: the actors that start below load them
        # Bad paths and columns fail in preflight, before anything is written; Ray and the actors start meanwhile
        # (Ray in this thread: it ties its processes to the thread that starts them), so the check runs beside their
        # start-up instead of before it, and a failed one stops them within seconds.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="preflight") as pool:
            checked = pool.submit(preflight, cfg)
            with _stopped_by_failed_check(checked), ray_running(cfg.cluster) as ray_logs:
                early_actors = launch_early(cfg, resolve_device(cfg.device))
                checked.result()
                root = args.run_dir or f"runs/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
                run_dir = RunDir.create(root, overwrite=args.overwrite)
                log.into(run_dir.root / "logs")
                atomic_write_text(run_dir.config_path, to_yaml(cfg))
                record_inputs(run_dir, cfg)  # what `resume` checks: the config and the prompt files are still these
                say(f"rlhf-loop: run directory {run_dir.root}{_where_logs_are(args, run_dir)}")
                _run_loop(cfg, run_dir, ray_logs, args.verbose, early_actors)


def _resume(args) -> None:
    from rlhf_loop.cluster.ray_cluster import ray_running
    from rlhf_loop.frontend.resume import resumed_config
    from rlhf_loop.rundir.manifest import RunDir

    with quiet(args.verbose) as log:
        run_dir = RunDir.existing(args.run_dir)
        log.into(run_dir.root / "logs")
        cfg = resumed_config(run_dir, args.overrides)
        say(f"rlhf-loop: resuming {run_dir.root}{_where_logs_are(args, run_dir)}")
        with ray_running(cfg.cluster) as ray_logs:
            _run_loop(cfg, run_dir, ray_logs, args.verbose)


def _run_loop(cfg, run_dir, ray_logs: Path, verbose: bool, early_actors: Future | None = None) -> None:
    from rlhf_loop import loop
    from rlhf_loop.cluster.ray_cluster import link_ray_logs
    from rlhf_loop.rundir.heartbeat import beating

    if not verbose:
        link_ray_logs(ray_logs, run_dir.root / "logs")
    with beating(run_dir):
        try:
            loop.run(cfg, run_dir, early_actors)
        except Exception as error:
            if isinstance(error, UserError) or (hint := full_disk_hint(run_dir.root)) is None:
                raise
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise UserError(f"{first_line}; {hint}") from error
    say(f"rlhf-loop: finished; `rlhf-loop report {run_dir.root}` writes its HTML report")


LOW_DISK_BYTES = 1 << 30  # below this much free space a failed write is most likely a full disk


def full_disk_hint(run_dir: Path) -> str | None:
    """What to do when a run failed on a disk with little room left (a checkpoint that did not fit fails deep in
    torch.save, with a message that does not say so); None while there is room."""
    free = shutil.disk_usage(run_dir).free
    if free >= LOW_DISK_BYTES:
        return None
    return (f"the disk of {run_dir} has {free / (1 << 20):.0f} MB free, most likely the cause: free space (the "
            f"largest files are learner checkpoints, iter_*/learner/ in earlier runs), then "
            f"`rlhf-loop resume {run_dir}`")


@contextlib.contextmanager
def _stopped_by_failed_check(checked: Future) -> Iterator[None]:
    """When starting Ray fails too, the config check's error is the one to show: it names what to fix."""
    try:
        yield
    except BaseException:
        if checked.exception() is not None:
            raise checked.exception() from None
        raise


def _where_logs_are(args, run_dir) -> str:
    return "" if args.verbose else f" (the libraries' output: {run_dir.root / 'logs'}/; --verbose shows it here)"


def _status(args) -> None:
    from rlhf_loop.frontend.status import describe, run_status, watch

    if args.watch:
        if args.interval <= 0:
            raise UserError(f"--interval must be > 0 seconds, got {args.interval:g}")
        watch(args.run_dir, args.interval)
        return
    status = run_status(args.run_dir)
    print(json.dumps(status, indent=2) if args.json else describe(status))


def _plan(args) -> int:
    from rlhf_loop.config import load_config
    from rlhf_loop.frontend.plan import describe_plan, plan_report

    report = plan_report(load_config(args.config, args.overrides))
    print(describe_plan(report))
    return 1 if report.problems else 0


def _export(args) -> None:
    from rlhf_loop.driver.export import export_iteration

    export_iteration(args.run_dir, args.iteration, args.to)
    print(f"rlhf-loop: exported iteration {args.iteration} of {args.run_dir} to {args.to} (policy/, pairs/)",
          file=sys.stderr)


def _report(args) -> None:
    from rlhf_loop.frontend.report import write_report

    print(f"rlhf-loop: report written to {write_report(args.run_dir)}", file=sys.stderr)


def _serve_reward(args) -> None:
    from reward.server import load_reward_config, serve

    if args.token is not None:
        print("rlhf-loop: warning: --token is visible to every user of this machine (ps, /proc); "
              "set RLHF_LOOP_REWARD_TOKEN instead", file=sys.stderr)
    serve(load_reward_config(args.config, args.overrides), host=args.host, port=args.port,
          replicas=args.replicas, token=args.token or os.environ.get("RLHF_LOOP_REWARD_TOKEN"))


def _cluster_release(args) -> None:
    from rlhf_loop.cluster.ray_cluster import start_ray, stop_ray
    from rlhf_loop.cluster.warm_registry import release_warm_actors
    from rlhf_loop.config import ClusterConfig

    try:
        start_ray(ClusterConfig(address=args.address, keep_warm=True))  # joined in the warm actors' namespace
        for line in release_warm_actors():
            print(f"rlhf-loop: {line}", file=sys.stderr)
    finally:
        stop_ray()


if __name__ == "__main__":
    sys.exit(main())
