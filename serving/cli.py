"""`feedloop` — one entry point, with subcommands."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

from serving.settings import ServingSettings


def _add_serving_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="policy checkpoint directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--reward-model", help="reward checkpoint directory (default: untrained, from the policy)")
    p.add_argument("--data-dir", help="where feedloop writes everything (env FEEDLOOP_DATA_DIR)")
    p.add_argument("--device", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-queue", type=int)
    p.add_argument("--max-input-tokens", type=int)
    p.add_argument("--max-total-tokens", type=int)
    p.add_argument("--kafka", help="Kafka bootstrap servers host:port[,host:port] (default: the embedded local log)")
    p.add_argument("--database-url", help="sqlite:///… or postgresql://… (default: SQLite in the data dir)")


def settings_from_args(args: argparse.Namespace) -> ServingSettings:
    """Flags given on the command line override FEEDLOOP_* environment variables."""
    fields = ServingSettings.model_fields
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if getattr(args, "no_grpc", False):
        given["grpc_port"] = None
    return ServingSettings(**given)


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.logs import configure_logging
    from serving.server import serve

    configure_logging(args.log_level)
    asyncio.run(serve(settings_from_args(args)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print what `serve` would load, without starting anything (dequantises the bundled model once)."""
    import torch

    from serving.checkpoint import model_version_of
    from serving.models import resolve_device
    from serving.server import resolve_policy_path

    settings = settings_from_args(args)
    policy_path = resolve_policy_path(settings)
    device, dtype = resolve_device(settings.device, settings.dtype)
    info = {
        "data_dir": str(settings.data_dir),
        "model": str(policy_path),
        "model_version": model_version_of(policy_path),
        "reward_model": settings.reward_model or "(untrained, initialised from the policy)",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "http": f"http://{settings.host}:{settings.port}",
        "grpc": f"{settings.host}:{settings.grpc_port}" if settings.grpc_port is not None else None,
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Consume completions and feedback from the bus into the store until SIGINT/SIGTERM."""
    import signal

    from feedback import topics
    from feedback.bus.factory import open_consumer, open_publisher
    from feedback.ingest import Ingestor
    from feedback.store.store import FeedbackStore
    from serving.logs import configure_logging
    from serving.settings import bus_url, database_url

    configure_logging(args.log_level)
    settings = settings_from_args(args)
    store = FeedbackStore(database_url(settings))
    store.migrate()
    url = bus_url(settings)
    consumer = open_consumer(url, settings.data_dir, group_id=args.group, topics=[topics.COMPLETIONS, topics.FEEDBACK],
                             consumer_options={"session_timeout_ms": args.session_timeout_ms})
    dead_letters = open_publisher(url, settings.data_dir, client_id=f"{args.group}-dead-letters")
    ingestor = Ingestor(consumer, store, dead_letters=dead_letters, max_records=args.max_records)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: ingestor.stop())
    if args.metrics_port is not None:
        from feedback.ingest import serve_metrics

        serve_metrics(ingestor, settings.host, args.metrics_port)
    import logging

    logging.getLogger("feedloop.ingest").info("ingesting", extra={"fl_bus": url, "fl_group": args.group})
    try:
        stats = ingestor.run()
    finally:
        consumer.close()
        dead_letters.close()
        store.close()
    logging.getLogger("feedloop.ingest").info("stopped", extra={"fl_inserted": stats.inserted,
                                                               "fl_duplicates": stats.duplicates,
                                                               "fl_dead_lettered": stats.dead_lettered})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    which = args.rest[0] if args.rest else "serve"
    if which == "ingest":
        from bench.ingest import main as bench_ingest

        return bench_ingest(args.rest)
    elif which == "swap":
        from bench.swap import main as bench_swap

        return bench_swap(args.rest)
    elif which == "gateway":
        from bench.gateway import main as bench_gateway

        return bench_gateway(args.rest)
    elif which == "train":
        from bench.train import main as bench_train

        return bench_train(args.rest)
    from bench.serve import main as bench_serve

    return bench_serve(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feedloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the policy and the reward model over HTTP and gRPC")
    _add_serving_flags(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8080)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 50051)")
    serve.add_argument("--no-grpc", action="store_true", help="do not start the gRPC server")
    serve.add_argument("--poll-interval", type=float,
                       help="seconds between reads of the model registry (default 1; admin token: "
                            "env FEEDLOOP_ADMIN_TOKEN)")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=cmd_serve)

    info = sub.add_parser("info", help="print the resolved settings, model paths and versions")
    _add_serving_flags(info)
    info.set_defaults(func=cmd_info)

    ingest = sub.add_parser("ingest", help="consume the bus into the store (a consumer group member)")
    ingest.add_argument("--data-dir", help="where feedloop writes everything (env FEEDLOOP_DATA_DIR)")
    ingest.add_argument("--kafka", help="Kafka bootstrap servers (default: the embedded local log)")
    ingest.add_argument("--database-url", help="sqlite:///… or postgresql://… (default: SQLite in the data dir)")
    ingest.add_argument("--group", default="feedloop-ingest", help="consumer group id")
    ingest.add_argument("--max-records", type=int, default=500,
                        help="events per database transaction (and per offset commit)")
    ingest.add_argument("--session-timeout-ms", type=int, default=10_000,
                        help="Kafka consumer-group session timeout (how soon a dead member's partitions move)")
    ingest.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    ingest.add_argument("--host", help="bind address for --metrics-port (default 127.0.0.1)")
    ingest.add_argument("--log-level", default="INFO")
    ingest.set_defaults(func=cmd_ingest)

    from feedback.datasets.cli import add_data_commands
    from simulate.cli import add_simulate_commands
    from serving.up import add_up_command
    from trainer.cli import add_train_commands
    from trainer.loop.cli import add_loop_commands

    add_up_command(sub)

    from serving.worker import add_worker_command

    add_worker_command(sub)

    from serving.models_cli import add_models_commands
    from serving.pools_cli import add_pools_commands

    add_data_commands(sub)
    add_models_commands(sub)
    add_pools_commands(sub)
    add_train_commands(sub)
    add_loop_commands(sub)
    add_simulate_commands(sub)

    bench = sub.add_parser("bench", help="benchmarks (write docs/benchmarks.md): `feedloop bench serve|ingest|train|swap|gateway --help`")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
