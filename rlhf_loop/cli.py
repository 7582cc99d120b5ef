"""`rlhf-loop`: run, resume and inspect online iterative DPO runs.

    rlhf-loop run CONFIG [key=value ...] [--run-dir DIR] [--overwrite]
    rlhf-loop resume RUN_DIR
    rlhf-loop status RUN_DIR [--json]
    rlhf-loop plan CONFIG [key=value ...]
    rlhf-loop export RUN_DIR --iteration N --to DIR
    rlhf-loop report RUN_DIR
    rlhf-loop serve-reward CONFIG [key=value ...] [--host H] [--port P] [--replicas N] [--token T]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rlhf_loop.errors import UserError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args) or 0
    except UserError as e:
        print(f"rlhf-loop: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-loop", description="Online iterative DPO.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="start a run from a config")
    run.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. iterations=2")
    run.add_argument("--run-dir", help="where the run writes everything (default: runs/CONFIG_NAME-TIMESTAMP)")
    run.add_argument("--overwrite", action="store_true", help="start afresh in an existing run directory")
    run.set_defaults(command=_run)

    resume = commands.add_parser("resume", help="continue a run from its first unfinished unit of work")
    resume.add_argument("run_dir")
    resume.set_defaults(command=_resume)

    status = commands.add_parser("status", help="where a run stands: iteration, stage, shards done, last metrics")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(command=_status)

    plan = commands.add_parser("plan", help="the resolved config, resources and memory per role, and checks")
    plan.add_argument("config")
    plan.add_argument("overrides", nargs="*", metavar="key=value")
    plan.set_defaults(command=_plan)

    export = commands.add_parser("export", help="an iteration's policy (HF format) and its pairs (HF dataset)")
    export.add_argument("run_dir")
    export.add_argument("--iteration", type=int, required=True, help="which finished iteration")
    export.add_argument("--to", required=True, help="a new (or empty) directory")
    export.set_defaults(command=_export)

    report = commands.add_parser("report", help="an HTML page with plots, metrics and sample pairs: RUN_DIR/report/")
    report.add_argument("run_dir", help="a finished, running or stopped run")
    report.set_defaults(command=_report)

    serve = commands.add_parser("serve-reward", help="serve the config's reward model over HTTP")
    serve.add_argument("config", help="YAML with a reward: section (a run config works)")
    serve.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of reward.* keys")
    serve.add_argument("--host", default="127.0.0.1", help="bind address; beyond loopback a --token is required")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--replicas", type=int, default=1, help="model copies serving requests in parallel")
    serve.add_argument("--token", default=None,
                       help="bearer token clients must send; prefer env RLHF_LOOP_REWARD_TOKEN (a flag shows in ps)")
    serve.set_defaults(command=_serve_reward)
    return parser


def _run(args) -> None:
    from rlhf_loop import loop
    from rlhf_loop.config import load_config, to_yaml
    from rlhf_loop.fingerprints import record_inputs
    from rlhf_loop.heartbeat import beating
    from rlhf_loop.preflight import preflight
    from rlhf_loop.rundir import RunDir, atomic_write_text

    cfg = load_config(args.config, args.overrides)
    preflight(cfg)  # bad paths and columns fail here, before anything is written or started
    root = args.run_dir or f"runs/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = RunDir.create(root, overwrite=args.overwrite)
    atomic_write_text(run_dir.config_path, to_yaml(cfg))
    record_inputs(run_dir, cfg)  # what `resume` checks: the config and the prompt files are still these
    print(f"rlhf-loop: run directory {run_dir.root}", file=sys.stderr)
    with beating(run_dir):
        loop.run(cfg, run_dir)


def _resume(args) -> None:
    from rlhf_loop import loop
    from rlhf_loop.config import load_config
    from rlhf_loop.fingerprints import check_inputs
    from rlhf_loop.heartbeat import beating
    from rlhf_loop.preflight import preflight
    from rlhf_loop.rundir import RunDir

    run_dir = RunDir.existing(args.run_dir)
    cfg = load_config(run_dir.config_path)
    preflight(cfg)
    check_inputs(run_dir, cfg)
    with beating(run_dir):
        loop.run(cfg, run_dir)


def _status(args) -> None:
    from rlhf_loop.status import describe, run_status

    status = run_status(args.run_dir)
    print(json.dumps(status, indent=2) if args.json else describe(status))


def _plan(args) -> int:
    from rlhf_loop.config import load_config
    from rlhf_loop.plan import describe_plan, plan_report

    report = plan_report(load_config(args.config, args.overrides))
    print(describe_plan(report))
    return 1 if report.problems else 0


def _export(args) -> None:
    from rlhf_loop.export import export_iteration

    export_iteration(args.run_dir, args.iteration, args.to)
    print(f"rlhf-loop: exported iteration {args.iteration} of {args.run_dir} to {args.to} (policy/, pairs/)",
          file=sys.stderr)


def _report(args) -> None:
    from rlhf_loop.report import write_report

    print(f"rlhf-loop: report written to {write_report(args.run_dir)}", file=sys.stderr)


def _serve_reward(args) -> None:
    from reward.server import load_reward_config, serve

    if args.token is not None:
        print("rlhf-loop: warning: --token is visible to every user of this machine (ps, /proc); "
              "set RLHF_LOOP_REWARD_TOKEN instead", file=sys.stderr)
    serve(load_reward_config(args.config, args.overrides), host=args.host, port=args.port,
          replicas=args.replicas, token=args.token or os.environ.get("RLHF_LOOP_REWARD_TOKEN"))


if __name__ == "__main__":
    sys.exit(main())
