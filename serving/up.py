"""`feedloop up`: the whole platform on one machine — gateway, ingestor and trainer loop — as three
processes under one supervisor, sharing one data directory (local log, SQLite, checkpoints).

Processes, not threads: each service is also deployed on its own (`feedloop serve`, `feedloop
ingest`, `feedloop loop`), and training must not share the gateway's one torch thread. The
supervisor starts the gateway first (it dequantises the bundled model once and registers what it
serves), waits for /health, then the ingestor and the loop; a service that dies is restarted with
backoff (the loop resumes its run, the ingestor its committed offsets). SIGINT/SIGTERM stop all
three in reverse order, each with SIGTERM first.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("feedloop.up")

RESTART_BACKOFF = (1, 2, 5, 10, 30)


@dataclass
class Service:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    exits: list[int] = field(default_factory=list)


def add_up_command(subparsers) -> None:
    up = subparsers.add_parser("up", help="the whole platform on one machine: gateway + ingestor + trainer loop")
    up.add_argument("--model", help="policy checkpoint directory (default: the bundled SmolLM2-135M-Instruct)")
    up.add_argument("--reward-model", help="reward checkpoint directory (default: untrained, from the policy)")
    up.add_argument("--data-dir", help="where feedloop writes everything (env FEEDLOOP_DATA_DIR)")
    up.add_argument("--host", default="127.0.0.1", help="bind address")
    up.add_argument("--port", type=int, default=8080, help="HTTP port")
    up.add_argument("--grpc-port", type=int, default=50051, help="gRPC port")
    up.add_argument("--no-grpc", action="store_true")
    up.add_argument("--kafka", help="Kafka bootstrap servers (default: the embedded local log)")
    up.add_argument("--database-url", help="sqlite:///… or postgresql://… (default: SQLite in the data dir)")
    up.add_argument("--loop-config", help="loop recipe (default trainer/configs/loop.yaml)")
    up.add_argument("--no-loop", action="store_true", help="serve and ingest only (no retraining)")
    up.add_argument("--device", help="auto | cpu | cuda[:N] (gateway)")
    up.add_argument("--poll-interval", type=float, help="seconds between the gateway's registry reads")
    up.add_argument("--log-level", default="INFO")
    up.set_defaults(func=cmd_up)


def service_commands(args: argparse.Namespace) -> list[Service]:
    """The three services' command lines (what ops would run as separate deployments)."""
    feedloop = [sys.executable, "-m", "serving.cli"]
    common = [f for flag, value in (("--data-dir", args.data_dir), ("--kafka", args.kafka),
                                    ("--database-url", args.database_url)) if value for f in (flag, value)]
    serve = feedloop + ["serve", *common, "--host", args.host, "--port", str(args.port),
                        "--log-level", args.log_level]
    serve += ["--no-grpc"] if args.no_grpc else ["--grpc-port", str(args.grpc_port)]
    for flag, value in (("--model", args.model), ("--reward-model", args.reward_model), ("--device", args.device)):
        if value is not None:
            serve += [flag, str(value)]
    services = [Service("gateway", serve),
                Service("ingest", feedloop + ["ingest", *common, "--log-level", args.log_level])]
    if not args.no_loop:
        loop = feedloop + ["loop", *[f for flag, value in (("--data-dir", args.data_dir),
                                                             ("--database-url", args.database_url))
                                     if value for f in (flag, value)], "--log-level", args.log_level]
        if args.loop_config:
            loop += ["--config", args.loop_config]
        services.append(Service("loop", loop))
    return services


class Supervisor:
    def __init__(self, services: list[Service], health_url: str, env: dict[str, str]) -> None:
        self.services = services
        self.health_url = health_url
        self.env = env
        self._stop = threading.Event()

    def start(self, service: Service) -> None:
        service.process = subprocess.Popen(service.argv, env=self.env)
        service.started_at = time.monotonic()
        log.info("started", extra={"fl_service": service.name, "fl_pid": service.process.pid})

    def wait_healthy(self, gateway: Service, timeout: float = 600) -> bool:
        """Wait for the gateway's /health (the first start dequantises the bundled model: ~30 s)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            if gateway.process.poll() is not None:
                return False
            try:
                if httpx.get(self.health_url, timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            self._stop.wait(0.5)
        return False

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        gateway, rest = self.services[0], self.services[1:]
        self.start(gateway)
        if not self.wait_healthy(gateway):
            if not self._stop.is_set():
                log.error("the gateway did not become healthy", extra={"fl_exit": gateway.process.poll()})
            self.shutdown()
            return 1
        for service in rest:
            self.start(service)
        log.info("platform up", extra={"fl_services": {s.name: s.process.pid for s in self.services}})
        while not self._stop.wait(0.5):
            for service in self.services:
                code = service.process.poll()
                if code is None:
                    continue
                service.exits.append(code)
                delay = RESTART_BACKOFF[min(service.restarts, len(RESTART_BACKOFF) - 1)]
                log.warning("service exited; restarting", extra={"fl_service": service.name, "fl_exit": code,
                                                                 "fl_restart_in_s": delay})
                if self._stop.wait(delay):
                    break
                service.restarts += 1
                self.start(service)
        self.shutdown()
        return 0

    def shutdown(self, grace: float = 30) -> None:
        for service in reversed(self.services):
            p = service.process
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for service in reversed(self.services):
            p = service.process
            if p is None:
                continue
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("killing", extra={"fl_service": service.name})
                p.kill()
                p.wait()
        log.info("platform stopped")


def cmd_up(args: argparse.Namespace) -> int:
    from serving.logs import configure_logging
    from serving.settings import ServingSettings, bus_url, database_url

    configure_logging(args.log_level)
    overrides = {k: v for k, v in {"data_dir": args.data_dir, "kafka": args.kafka,
                                   "database_url": args.database_url}.items() if v}
    settings = ServingSettings(**overrides)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    args.data_dir = str(settings.data_dir.resolve())  # the children must agree on one directory
    services = service_commands(args)
    env = dict(os.environ)
    if args.poll_interval is not None:
        env["FEEDLOOP_POLL_INTERVAL"] = str(args.poll_interval)
    http = f"http://{args.host}:{args.port}"
    supervisor = Supervisor(services, f"{http}/health", env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: supervisor.stop())
    print(where_everything_is(args, settings, http, bus_url(settings), database_url(settings)), flush=True)
    return supervisor.run()


def where_everything_is(args, settings, http: str, bus: str, database: str) -> str:
    from serving.server import _redact

    data = Path(settings.data_dir)
    lines = [
        "feedloop up",
        f"  chat / generate   {http}/v1/chat/completions   (TGI: {http}/generate)",
        f"  compare & rate    {http}/v1/compare   {http}/v1/feedback",
        f"  models            {http}/v1/admin/models   (feedloop models list)",
        f"  metrics           {http}/metrics",
        f"  gRPC              {'off' if args.no_grpc else f'{args.host}:{args.grpc_port}'}",
        f"  bus               {bus}",
        f"  store             {_redact(database)}",
        f"  data directory    {data}",
        f"  training runs     {data / 'runs'}   (feedloop runs list)" if not args.no_loop else "  training loop     off",
        "  stop with Ctrl-C",
    ]
    return "\n".join(lines)
