"""Real processes for the upstream tests: `feedloop worker` subprocesses on 127.0.0.1, and a gateway
(`build_services` with FEEDLOOP_UPSTREAMS, uvicorn; optionally a SQLite registry it follows) in one
event loop on a background thread."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from feedback.store import FeedbackStore
from serving.http.app import create_app
from serving.server import build_services, start_deployments
from serving.services import Services
from serving.settings import ServingSettings
from tests.fakes import MemoryPublisher

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """`python -m serving.cli worker ...` as a child process; `kill()` is a real SIGKILL."""

    def __init__(self, model: Path, data_dir: Path, role: str = "policy", port: int | None = None) -> None:
        self.model, self.data_dir, self.role = model, data_dir, role
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / f"worker-{self.port}.log"

    def start(self) -> "Worker":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FEEDLOOP_ADMIN_TOKEN": ""}
        cmd = [sys.executable, "-m", "serving.cli", "worker", "--role", self.role, "--model", str(self.model),
               "--port", str(self.port), "--no-grpc", "--device", "cpu", "--data-dir", str(self.data_dir),
               "--max-batch-size", "8", "--max-queue", "64", "--max-input-tokens", "256",
               "--max-total-tokens", "512", "--log-level", "WARNING"]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, \
                f"worker exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"worker {self.url} did not become healthy: {self.log.read_text()[-2000:]}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._out.close()


@dataclass
class Gateway:
    url: str
    services: Services
    publisher: MemoryPublisher
    loop: asyncio.AbstractEventLoop
    store: FeedbackStore | None = None  # with `database_url`: the registry the gateway follows

    def call(self, coro, timeout: float = 60.0):
        """Run a coroutine on the gateway's event loop (the pool lives there)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def run_gateway(tmp: Path, upstreams: dict, tokenizer: Path, database_url: str | None = None,
                **settings) -> Iterator[Gateway]:
    """With `database_url`: a store whose model registry the gateway follows (start_deployments, as
    `feedloop serve` does), so promotions roll across the upstreams (serving/fleet.py)."""
    upstreams = {"tokenizer": str(tokenizer), **upstreams}
    settings = ServingSettings(data_dir=tmp / "gateway", upstreams=json.dumps(upstreams), grpc_port=None,
                               max_input_tokens=256, max_total_tokens=512, **settings)
    store = None
    if database_url is not None:
        store = FeedbackStore(database_url)
        store.migrate()
    publisher = MemoryPublisher()
    services = build_services(settings, publisher=publisher)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(services), log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=2))
    failure: list[BaseException] = []
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        loops.append(asyncio.get_running_loop())
        await services.start()
        try:
            if store is not None:
                await start_deployments(services, store)
            await server.serve(sockets=[sock])
        finally:
            if services.deployments is not None:
                await services.deployments.stop()
            await services.stop()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, f"the gateway did not start: {failure}"
        time.sleep(0.01)
    try:
        yield Gateway(f"http://127.0.0.1:{port}", services, publisher, loops[0], store)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        if store is not None:
            store.close()
    assert not thread.is_alive(), "the gateway did not stop"
    assert not failure, failure


@contextmanager
def serve_app(app, port: int = 0) -> Iterator[str]:
    """Any ASGI app on 127.0.0.1 (uvicorn on a thread of its own; `port` 0: a free one); yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def tgi_server(name: str, delay: float = 0.01) -> FastAPI:
    """A TGI-compatible server (TGI's `POST /` event stream, `GET /health`) standing in for
    text-generation-inference, which cannot run here; its tokens are `name`."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.post("/")
    async def generate(request: Request) -> StreamingResponse:
        body = await request.json()
        n = body["parameters"]["max_new_tokens"]

        async def events():
            for i in range(n):
                await asyncio.sleep(delay)
                last = i == n - 1
                event = {"token": {"id": i, "text": f"{name} ", "logprob": -0.5, "special": False},
                         "top_tokens": None, "generated_text": f"{name} " * n if last else None,
                         "details": {"finish_reason": "length", "generated_tokens": n, "seed": None,
                                     "input_length": 2} if last else None}
                yield f"data:{json.dumps(event)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
