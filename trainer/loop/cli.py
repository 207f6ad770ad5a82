"""`feedloop loop` (the trainer service) and `feedloop runs list|show` (what it did)."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where feedloop writes everything (env FEEDLOOP_DATA_DIR)")
    p.add_argument("--database-url", help="sqlite:///… or postgresql://… (default: SQLite in the data dir)")


def _open_store(args):
    from feedback.store.store import FeedbackStore
    from serving.settings import ServingSettings, database_url

    overrides = {k: v for k, v in {"data_dir": args.data_dir, "database_url": args.database_url}.items() if v}
    settings = ServingSettings(**overrides)
    store = FeedbackStore(database_url(settings))
    store.migrate()
    return settings, store


def cmd_loop(args: argparse.Namespace) -> int:
    from serving.logs import configure_logging
    from trainer.config import ConfigError
    from trainer.loop.config import load_loop_config
    from trainer.loop.service import LoopBusy, LoopMetrics, LoopService

    configure_logging(args.log_level)
    try:
        config = load_loop_config(args.config)
    except ConfigError as e:
        print(f"feedloop loop: {e}", file=sys.stderr)
        return 2
    settings, store = _open_store(args)
    runs_dir = Path(args.runs_dir) if args.runs_dir else settings.data_dir / "runs"
    metrics = LoopMetrics()
    service = LoopService(store, config, runs_dir, metrics=metrics)
    try:
        service.acquire()
    except LoopBusy as e:
        print(f"feedloop loop: {e}", file=sys.stderr)
        store.close()
        return 2
    if args.metrics_port is not None:
        metrics.serve(args.host, args.metrics_port)
    def on_signal(*_):
        # Between runs the loop stops at once. During a run the process ends now (checkpoints and
        # training states are written atomically); the run stays `running` in the store and resumes
        # from its last saved state when the loop starts again.
        service.stop()
        if service.busy:
            raise SystemExit(0)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        if args.once:
            run = service.tick()
            print(json.dumps(run_summary(run) if run else None))
        else:
            service.run_forever()
    finally:
        service.release()
        store.close()
    return 0


def run_summary(run) -> dict:
    return {"run_id": run.run_id, "status": run.status, "stage": run.stage, "plan": run.plan,
            "trigger": run.trigger, "policy_version": run.policy_version, "reward_version": run.reward_version,
            "snapshots": {k: v.get("hash") for k, v in run.snapshots.items()}, "report": run.report,
            "metrics": run.metrics, "error": run.error, "attempts": run.attempts,
            "created_at": run.created_at.isoformat(),
            "finished_at": run.finished_at.isoformat() if run.finished_at else None}


def cmd_runs(args: argparse.Namespace) -> int:
    from feedback.store.runs import TrainingRuns

    _, store = _open_store(args)
    try:
        runs = TrainingRuns(store)
        if args.runs_command == "show":
            run = runs.get(args.run_id)
            if run is None:
                print(f"feedloop runs show: no run {args.run_id}", file=sys.stderr)
                return 2
            print(json.dumps(run_summary(run), indent=2))
            return 0
        rows = runs.list(args.limit)
        if args.json:
            print(json.dumps([run_summary(r) for r in rows], indent=2))
            return 0
        print(f"{'run':<32} {'status':<10} {'plan':<16} {'policy candidate':<24} created")
        for r in rows:
            print(f"{r.run_id:<32} {r.status:<10} {','.join(r.plan):<16} {r.policy_version or '-':<24} "
                  f"{r.created_at:%Y-%m-%d %H:%M:%S}")
        return 0
    finally:
        store.close()


def add_loop_commands(subparsers) -> None:
    loop = subparsers.add_parser("loop", help="the trainer service: retrain on new feedback, gate, promote")
    _store_args(loop)
    loop.add_argument("--config", help="loop recipe (default trainer/configs/loop.yaml)")
    loop.add_argument("--runs-dir", help="where runs write data and checkpoints (default <data dir>/runs)")
    loop.add_argument("--once", action="store_true", help="resume or start at most one run, then exit")
    loop.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    loop.add_argument("--host", default="127.0.0.1", help="bind address for --metrics-port")
    loop.add_argument("--log-level", default="INFO")
    loop.set_defaults(func=cmd_loop)

    runs = subparsers.add_parser("runs", help="training runs of the loop: `feedloop runs list|show RUN_ID`")
    commands = runs.add_subparsers(dest="runs_command", required=True)
    listing = commands.add_parser("list", help="newest first")
    _store_args(listing)
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_runs)
    show = commands.add_parser("show", help="one run: plan, snapshots, candidates, gate report, metrics")
    _store_args(show)
    show.add_argument("run_id")
    show.set_defaults(func=cmd_runs)
