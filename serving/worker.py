"""`feedloop worker --role policy|reward`: one model server for a fleet behind feedloop gateways.

A worker runs the in-process engine (the same LocalEngine, batching, lanes and reward scoring as
`feedloop serve`) and serves it over:

    POST /, /generate, /generate_stream, GET /info    TGI-compatible (the gateway's TGIUpstream, or any TGI client)
    POST /v1/completions, /v1/chat/completions         OpenAI-compatible
    POST /v1/score                                     the reward model (role reward)
    GET  /health, /metrics                             probes (with the served versions and the serving
                                                       checkpoint's path) and Prometheus
    POST /v1/admin/reload                              hot-swap: {"model": DIR, "version", "checksums",
                                                                  "canary_percent", "lease_token"}

What it does not do: record anything (the gateway stamps completion ids and publishes completions),
serve feedback or the model registry's admin routes. A policy worker answers /v1/score with 404
(`wrong_role`) and a reward worker the generation routes likewise.

Reload: the directory is checked (every file against `checksums` — what the registry recorded —, else
against its own manifest), loaded on a thread that then ends, added to the engine as a lane of its
own and routed: new requests run on it while requests already running finish on the old weights,
and the old lane is dropped once drained (serving/engine/local.py). Reloads are serialised. A reload
carrying a `lease_token` lower than one seen before is refused (409 `stale_leader`): it comes from a
gateway that lost the rollout lease to the one that sent the higher token (serving/leadership.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import SimpleNamespace

from fastapi import APIRouter, Depends, FastAPI, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from serving.engine.client import EngineClient, RewardClient
from serving.engine.types import EngineInfo, Routing, ScoreResult
from serving.errors import NotFound
from serving.http.dependencies import ServicesDep
from serving.http.errors import ApiError, error_response, install_error_handlers
from serving.metrics import CONTENT_TYPE_LATEST
from serving.services import Services
from serving.settings import ServingSettings

log = logging.getLogger(__name__)

ROLES = ("policy", "reward")
RELOAD_PATH = "/v1/admin/reload"


class _NoPolicy(EngineClient):
    """A reward worker's generation routes: 404 `wrong_role`."""

    model_version = "none"

    def info(self) -> EngineInfo:
        # no limits of its own: requests pass validation and get the 404 from generate()
        return EngineInfo("none", "none", "none", "none", 2**31 - 1, 2**31 - 1, 0, 0, extra={"role": "reward"})

    def render_chat(self, messages):
        raise _wrong_role("reward", "generation")

    def count_tokens(self, text):
        raise _wrong_role("reward", "generation")

    def generate(self, prompt, params, request_id, model_version=None):
        raise _wrong_role("reward", "generation")

    def stats(self) -> dict:
        return {}


class _NoReward(RewardClient):
    """A policy worker's /v1/score: 404 `wrong_role`."""

    model_version = "none"
    trained = False

    async def score(self, pairs) -> ScoreResult:
        raise _wrong_role("policy", "/v1/score")


def _wrong_role(role: str, what: str) -> NotFound:
    other = "reward" if role == "policy" else "policy"
    return NotFound(f"this worker serves the {role} role; {what} is served by `feedloop worker --role {other}`",
                    code="wrong_role")


def build_worker_services(settings: ServingSettings, role: str) -> Services:
    """Load the role's model and build Services with no recording (call on a fresh thread)."""
    from serving.engine.local import LocalEngineClient, LocalRewardClient
    from serving.models import load_policy, load_reward
    from serving.server import resolve_policy_path

    if role not in ROLES:
        raise ValueError(f"--role must be policy or reward; got {role!r}")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if role == "policy":
        policy = load_policy(resolve_policy_path(settings), settings.device, settings.dtype)
        engine = LocalEngineClient(policy, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                                   max_input_tokens=settings.max_input_tokens,
                                   max_total_tokens=settings.max_total_tokens)
        reward: RewardClient = _NoReward()
    else:
        base = None
        if not settings.reward_model:  # untrained: initialised from the policy's weights (its body only)
            from transformers import AutoTokenizer

            from serving.checkpoint import model_version_of

            path = resolve_policy_path(settings)
            base = SimpleNamespace(path=path, model_version=model_version_of(path),
                                   tokenizer=AutoTokenizer.from_pretrained(path))
        loaded = load_reward(Path(settings.reward_model) if settings.reward_model else None, base,
                             settings.device, settings.dtype)
        engine = _NoPolicy()
        # Scoring gets one thread of its own: the process's only torch thread.
        reward = LocalRewardClient(loaded, max_length=settings.max_total_tokens)
    return Services.build(settings, engine, reward, publisher=None, completion_index_size=1024)


# -- routes of the worker itself --------------------------------------------------------------------

ops = APIRouter(tags=["worker"])


def _role(services: Services) -> str:
    return "reward" if isinstance(services.engine, _NoPolicy) else "policy"


@ops.get("/health", responses={503: {"description": "The engine is not running"}})
async def health(services: ServicesDep) -> JSONResponse:
    """200 while the worker can serve; the versions it serves (the gateway's pools read them)."""
    role = _role(services)
    if role == "policy":
        services.engine.check_health()  # EngineUnavailable → 503
        engine = services.engine
        return JSONResponse({"status": "ok", "role": role, "model_version": engine.model_version,
                             "model_path": str(engine.policy.path), "routing": engine.routing.as_dict(),
                             "versions": engine.versions()})
    path = getattr(services.reward.reward, "path", None)  # None: untrained (no checkpoint)
    return JSONResponse({"status": "ok", "role": role, "model_version": services.reward.model_version,
                         "model_path": str(path) if path is not None else None,
                         "reward_model_version": services.reward.model_version,
                         "reward_model_trained": services.reward.trained})


@ops.get("/metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Checkpoint directory, as this worker sees it (a shared volume).")
    version: str | None = Field(None, description="The name answers carry (the registry's); default: the "
                                "directory's manifest version, else <dirname>-<weights hash>.")
    checksums: dict[str, str] | None = Field(None, description="sha256 per file (the registry's record); "
                                             "default: the directory's manifest.")
    canary_percent: float | None = Field(None, gt=0, le=100, description="Policy only: route this share of "
                                         "new requests to it and keep the serving version (a canary).")
    lease_token: int | None = Field(None, ge=1, description="The sending gateway's rollout-lease token "
                                    "(serving/leadership.py): lower than one seen before → 409 stale_leader.")


_reload_lock = asyncio.Lock()


def _admin_dependency():
    from serving.http.routers.admin import require_admin

    return Depends(require_admin)


def _reload_router(services: Services) -> APIRouter:
    from prometheus_client import Counter

    router = APIRouter(tags=["worker"], dependencies=[_admin_dependency()])
    reloads = Counter("feedloop_worker_reloads", "POST /v1/admin/reload by outcome (ok, refused, stale_leader)",
                      ["outcome"], registry=services.metrics.registry)
    seen = {"lease_token": 0}  # the highest rollout-lease token a reload came with (serving/leadership.py)

    @router.post(RELOAD_PATH)
    async def reload(body: ReloadRequest, services: ServicesDep) -> JSONResponse:
        """Load, verify and switch to a model version (see the module docstring). 409 when refused."""
        from serving.deployment import Refused, verify_files
        from serving.server import in_fresh_thread

        role = _role(services)
        path = Path(body.model)
        async with _reload_lock:
            fence = seen["lease_token"]
            if body.lease_token is not None and body.lease_token < fence:
                reloads.labels("stale_leader").inc()
                return error_response(RELOAD_PATH, ApiError(
                    409, f"a gateway holding a newer rollout lease (token {fence}) has reloaded this worker; "
                    f"token {body.lease_token} is stale", "refused", "lease_token", "stale_leader"))
            if body.lease_token is not None:
                seen["lease_token"] = body.lease_token
            started = time.perf_counter()
            try:
                if role == "policy":
                    previous, version = await _reload_policy(services, body, path, in_fresh_thread, verify_files)
                else:
                    previous, version = await in_fresh_thread(lambda: _reload_reward(services, body, path,
                                                                                     verify_files))
            except Refused as exc:
                reloads.labels("refused").inc()
                log.warning("model version refused", extra={"fl_path": str(path), "fl_reason": exc.kind,
                                                            "fl_error": str(exc)})
                return error_response(RELOAD_PATH, ApiError(409, str(exc), "refused", "model", exc.kind))
        seconds = time.perf_counter() - started
        reloads.labels("ok").inc()
        answer = {"role": role, "model_version": version, "previous": previous, "load_s": round(seconds, 3)}
        if role == "policy":
            answer["routing"] = services.engine.routing.as_dict()
        log.info("deployment applied", extra={"fl_role": role, "fl_model_version": version,
                                              "fl_previous": previous, "fl_load_s": answer["load_s"]})
        return JSONResponse(answer)

    return router


def _recorded(body: ReloadRequest, path: Path) -> dict[str, str]:
    from serving.checkpoint import read_manifest
    from serving.deployment import Refused

    if body.checksums:
        return body.checksums
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest and manifest.get("files"):
        return manifest["files"]
    raise Refused("checksum", f"nothing to verify {path} against: send `checksums` (the registry's record) "
                              "or give the directory a manifest.json")


async def _reload_policy(services: Services, body: ReloadRequest, path: Path, in_fresh_thread, verify_files):
    from serving.checkpoint import model_version_of
    from serving.deployment import Refused
    from serving.models import load_policy

    engine = services.engine
    settings = services.settings
    previous = engine.model_version
    if not path.is_dir():
        raise Refused("load", f"checkpoint directory {path} does not exist")
    version = body.version or model_version_of(path)

    def load() -> None:
        verify_files(path, _recorded(body, path))
        try:
            policy = load_policy(path, settings.device, settings.dtype)
        except Exception as exc:
            raise Refused("load", f"loading failed: {type(exc).__name__}: {exc}") from exc
        policy.model_version = version
        try:
            engine.add_version(policy)
        except ValueError as exc:
            raise Refused("incompatible", str(exc)) from exc

    if version not in engine.versions():
        await in_fresh_thread(load)
    if body.canary_percent is not None and version != previous:
        routing = Routing(previous, version, body.canary_percent)
    else:
        routing = Routing(version)
    engine.set_routing(routing)
    return previous, version


def _reload_reward(services: Services, body: ReloadRequest, path: Path, verify_files):
    from serving.checkpoint import model_version_of
    from serving.deployment import Refused
    from serving.models import load_reward

    settings = services.settings
    verify_files(path, _recorded(body, path))
    try:
        reward = load_reward(path, None, settings.device, settings.dtype)
    except Exception as exc:
        raise Refused("load", f"loading failed: {type(exc).__name__}: {exc}") from exc
    reward.model_version = body.version or model_version_of(path)
    return services.reward.swap(reward), reward.model_version


def create_worker_app(services: Services) -> FastAPI:
    """The worker's HTTP app: TGI, OpenAI and score routes over `services`, plus /health, /metrics and
    the reload route. The caller starts and stops the services."""
    from serving.http.middleware import BodyLimitMiddleware, ModelVersionHeaderMiddleware, UnexpectedErrorMiddleware
    from serving.http.routers import openai, score, tgi

    app = FastAPI(title="feedloop worker", version="1")
    app.state.services = services
    install_error_handlers(app)

    def version_for_path(path: str) -> str:
        return services.reward.model_version if path == "/v1/score" or _role(services) == "reward" \
            else services.engine.model_version

    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=services.settings.max_body_bytes)
    app.add_middleware(ModelVersionHeaderMiddleware, version_for_path=version_for_path)
    for router in (tgi.router, openai.router, score.router, ops, _reload_router(services)):
        app.include_router(router)
    return app


async def run_worker(settings: ServingSettings, role: str, grpc_port: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM. gRPC only when `grpc_port` is given."""
    import uvicorn

    from serving.server import in_fresh_thread, serve_until_signal

    services = await in_fresh_thread(lambda: build_worker_services(settings, role))
    await services.start()
    grpc_server = None
    try:
        if grpc_port is not None:
            from serving.grpc.server import start_grpc_server

            grpc_server = await start_grpc_server(services, settings.host, grpc_port)
        config = uvicorn.Config(create_worker_app(services), host=settings.host, port=settings.port,
                                log_config=None, timeout_graceful_shutdown=10)
        version = services.engine.model_version if role == "policy" else services.reward.model_version
        log.info("worker serving", extra={"fl_role": role, "fl_http": f"http://{settings.host}:{settings.port}",
                                          "fl_model_version": version})
        await serve_until_signal(config)
    finally:
        if grpc_server is not None:
            from serving.grpc.server import stop_grpc_server

            await stop_grpc_server(grpc_server, grace=5)
        await services.stop()


def add_worker_command(sub) -> None:
    """`feedloop worker`: serve's flags plus --role."""
    from serving.cli import _add_serving_flags

    p = sub.add_parser("worker", help="serve one model (policy or reward) for gateways in front of a fleet")
    p.add_argument("--role", choices=ROLES, help="policy (generation routes) or reward (/v1/score); "
                   "env FEEDLOOP_WORKER_ROLE, default policy")
    _add_serving_flags(p)
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8080)")
    p.add_argument("--grpc-port", type=int, help="also serve gRPC on this port (default: no gRPC)")
    p.add_argument("--no-grpc", action="store_true", help="no gRPC (the default for workers)")
    p.add_argument("--poll-interval", type=float, help="accepted for serve's flags; workers do not poll")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args) -> int:
    from serving.cli import settings_from_args
    from serving.logs import configure_logging

    configure_logging(args.log_level)
    grpc_port = None if args.no_grpc else args.grpc_port
    args.grpc_port = None
    settings = settings_from_args(args)
    role = args.role or settings.worker_role
    if role not in ROLES:
        raise SystemExit(f"feedloop worker: --role must be policy or reward (got {role!r})")
    asyncio.run(run_worker(settings, role, grpc_port))
    return 0
