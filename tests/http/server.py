"""A real uvicorn server on 127.0.0.1 (a free port) in a background thread, so that the real
third-party clients (text_generation, openai) can be pointed at the app unchanged."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from feedback.bus.base import EventPublisher
from serving.http.app import create_app
from serving.services import Services
from serving.settings import ServingSettings
from tests.fakes import FakeEngine, FakeReward

SMALL_BODY_LIMIT = 4096  # bytes; small so the 413 tests send little


def fake_services(data_dir, engine: FakeEngine | None = None, publisher: EventPublisher | None = None,
                  **settings) -> Services:
    """Services over FakeEngine/FakeReward (default FakeEngine: capacity 4, prompts up to 64 words).
    Without `publisher` nothing is recorded (and /v1/feedback answers 503)."""
    settings.setdefault("max_body_bytes", SMALL_BODY_LIMIT)
    return Services.build(ServingSettings(data_dir=data_dir, **settings), engine or FakeEngine(), FakeReward(),
                          publisher=publisher)


@contextmanager
def serve_http(services: Services, *, manage_services: bool = False, start_timeout: float = 10.0) -> Iterator[str]:
    """Serve `create_app(services)`; yields the base URL ("http://127.0.0.1:PORT"); stops the server after."""
    app = create_app(services, manage_services=manage_services)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the kernel picks a free port; uvicorn serves on this very socket
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on" if manage_services else "off",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the test HTTP server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        # The shared real engine streams into this server's event loop: let cancelled requests
        # leave the engine before that loop closes.
        wait_until_idle(services)
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        wait_until_idle(services)


def wait_until_idle(services: Services, timeout: float = 5.0) -> bool:
    """True once the engine has nothing running or waiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = services.engine.stats()
        if not stats.get("batch_size") and not stats.get("queue_size"):
            return True
        time.sleep(0.01)
    return False
