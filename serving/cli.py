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


def cmd_bench(args: argparse.Namespace) -> int:
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
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=cmd_serve)

    info = sub.add_parser("info", help="print the resolved settings, model paths and versions")
    _add_serving_flags(info)
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="benchmarks (writes docs/benchmarks.md): `feedloop bench serve --help`")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
