"""Assembles the gateway: loads models, builds the services once, runs HTTP and gRPC together."""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from serving.engine.local import LocalEngineClient, LocalRewardClient
from serving.models import ensure_bundled_model, load_policy, load_reward
from serving.services import Services
from serving.settings import ServingSettings, bus_url, database_url

if TYPE_CHECKING:
    from serving.deployment import DeploymentWatcher

log = logging.getLogger(__name__)


class _Server:
    """uvicorn's server with our signal handling: uvicorn re-raises SIGTERM after its own shutdown,
    which would kill the process before gRPC drains and the engine stops. Here a signal only asks
    uvicorn to exit; `serve()` then returns and the caller shuts the rest down in order."""

    def __init__(self, config) -> None:
        import contextlib

        import uvicorn

        self._server = uvicorn.Server(config)
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]

    def request_exit(self) -> None:
        if self._server.should_exit:  # a second signal: stop waiting for open connections
            self._server.force_exit = True
        self._server.should_exit = True

    async def serve(self) -> None:
        await self._server.serve()


async def serve_until_signal(config) -> None:
    """Serve HTTP until SIGINT/SIGTERM asks uvicorn to exit; the caller then stops the rest in order."""
    server = _Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_exit)
    await server.serve()
    log.info("stopping", extra={"fl_reason": "signal"})


def resolve_policy_path(settings: ServingSettings) -> Path:
    """The policy checkpoint to serve: --model, else the bundled SmolLM2 (dequantised once)."""
    if settings.model:
        return Path(settings.model)
    return ensure_bundled_model(settings.data_dir)


def open_recording(settings: ServingSettings):
    """The publisher for served completions and feedback, and the store lookup for completions this
    gateway no longer remembers. `feedloop ingest` writes the events; the gateway writes only the
    model registry (what it loaded, refusals, automatic rollbacks: serving/deployment.py)."""
    from feedback.bus.factory import open_publisher
    from feedback.store.store import FeedbackStore

    publisher = open_publisher(bus_url(settings), settings.data_dir, client_id="feedloop-gateway")
    store = FeedbackStore(database_url(settings))
    try:
        store.migrate()  # idempotent; a fresh data directory gets its tables before the first lookup
    except Exception as exc:  # the database is down: serve anyway (the lookup answers from memory)
        log.warning("store unavailable at start-up", extra={"fl_error": f"{type(exc).__name__}: {exc}"})

    def lookup(ids: list[str]) -> dict[str, str]:
        try:
            return store.completion_prompt_keys(ids)
        except Exception as exc:  # database down: answer from memory only (the client may retry)
            log.warning("completion lookup failed", extra={"fl_error": f"{type(exc).__name__}: {exc}"})
            return {}

    return publisher, store, lookup


def build_services(settings: ServingSettings, publisher=None, completion_lookup=None) -> Services:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.upstreams:  # FEEDLOOP_UPSTREAMS: generation and scoring go to upstream pools
        from serving.upstreams.gateway import build_upstream_services

        return build_upstream_services(settings, publisher, completion_lookup)
    policy = load_policy(resolve_policy_path(settings), settings.device, settings.dtype)
    reward = load_reward(Path(settings.reward_model) if settings.reward_model else None, policy,
                         settings.device, settings.dtype)
    if not reward.trained:
        log.warning("reward model is untrained (initialised from the policy): its scores are not meaningful",
                    extra={"fl_reward_model_version": reward.model_version})
    engine = LocalEngineClient(policy, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                               max_input_tokens=settings.max_input_tokens,
                               max_total_tokens=settings.max_total_tokens)
    # Scoring runs on the engine's thread: one thread does all torch work (see LocalEngine.run_job).
    scorer = LocalRewardClient(reward, max_length=settings.max_total_tokens, run_job=engine.engine.run_job)
    return Services.build(settings, engine, scorer, publisher=publisher, completion_lookup=completion_lookup)


async def in_fresh_thread(fn):
    """Run `fn` on a thread that ends afterwards (not a pooled one that would keep an OpenMP team)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def target():
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(future.set_exception, exc)
        else:
            loop.call_soon_threadsafe(future.set_result, result)

    thread = threading.Thread(target=target, name="feedloop-load")
    thread.start()
    try:
        return await future
    finally:
        await asyncio.to_thread(thread.join)


async def serve(settings: ServingSettings, services: Services | None = None) -> None:
    """Run until interrupted (SIGINT/SIGTERM via uvicorn)."""
    import uvicorn

    from serving.grpc.server import start_grpc_server, stop_grpc_server
    from serving.http.app import create_app

    publisher = store = None
    if services is None:
        publisher, store, lookup = open_recording(settings)
        services = await in_fresh_thread(lambda: build_services(settings, publisher, lookup))
    await services.start()
    grpc_server = None
    try:
        # registers what was loaded, applies the registry's choice before traffic; with upstreams
        # (FEEDLOOP_UPSTREAMS) the registry's changes are rolled across the fleet (serving/fleet.py)
        if store is not None:
            await start_deployments(services, store)
        if settings.grpc_port is not None:
            grpc_server = await start_grpc_server(services, settings.host, settings.grpc_port)
        app = create_app(services)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                                timeout_graceful_shutdown=10)
        log.info("serving", extra={"fl_http": f"http://{settings.host}:{settings.port}",
                                   "fl_grpc": f"{settings.host}:{grpc_server.bound_port}" if grpc_server else None,
                                   "fl_model_version": services.engine.model_version,
                                   "fl_reward_model_version": services.reward.model_version,
                                   "fl_bus": bus_url(settings), "fl_database": _redact(database_url(settings))})
        await serve_until_signal(config)
    finally:
        if grpc_server is not None:
            await stop_grpc_server(grpc_server, grace=5)
        if services.deployments is not None:
            await services.deployments.stop()
        await services.stop()  # drains the recorder into the publisher
        if publisher is not None:
            await asyncio.to_thread(publisher.close)
        if store is not None:
            store.close()


async def start_deployments(services: Services, store) -> "DeploymentWatcher":
    """Follow the model registry in `store` (serving/deployment.py): kept on `services.deployments`
    (the admin routes use it). The caller stops it (`services.deployments.stop()`) before the services."""
    from feedback.store.registry import ModelRegistry
    from serving.deployment import DeploymentWatcher

    watcher = DeploymentWatcher.from_settings(ModelRegistry(store), services)
    services.deployments = watcher
    await watcher.start()
    return watcher


def _redact(url: str) -> str:
    """A database URL for logs: no password."""
    import re

    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)
