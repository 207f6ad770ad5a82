"""`FEEDLOOP_UPSTREAMS`: which inference servers the gateway sends generations and scores to.

JSON (the env var's value, or `@/path/to/file.json` to read it from a file):

    {
      "policy": [
        {"url": "http://policy-0:8080", "kind": "feedloop"},
        {"url": "http://tgi:80", "kind": "tgi", "model_version": "smollm2-v3"},
        {"url": "http://vllm:8000", "kind": "openai", "model": "smollm2", "api_key": "…"}
      ],
      "reward": [{"url": "http://reward-0:8080"}],
      "tokenizer": "/models/smollm2",
      "routing": {"serving": "v1", "canary": "v2", "canary_percent": 10},
      "options": {"request_timeout": 300, "connect_timeout": 3, "read_timeout": 60,
                  "health_interval": 2, "health_timeout": 2, "max_attempts": 3,
                  "breaker_failures": 3, "breaker_cooldown": 5, "discovery_interval": 5,
                  "nameservers": null}
    }

- `kind`: `feedloop` (a `feedloop worker`; spoken to over its TGI routes) | `tgi` | `openai` (vLLM,
  or any OpenAI-compatible server: `/v1/completions`; blue/green only) | `sglang` (OpenAI routes for
  generation, reloaded in place through `/update_weights_from_disk`). Default `feedloop`.
- `model_version`: the version an upstream serves when its answers do not say (`X-Model-Version`,
  which feedloop workers send; TGI and vLLM do not). Also what explicit-version requests and
  `routing` match on; feedloop workers report it on `/health` too.
- `model`: the model name OpenAI-compatible servers expect (default: the first of `/v1/models`).
- `tokenizer`: the directory (or hub id) whose tokenizer renders chats and counts tokens at the
  gateway; default `--model`, else the bundled SmolLM2's.
- `routing`: optional split between versions (canary); without it any healthy upstream serves.
- `discovery`: `dns` | `srv` — the URL names a headless Service whose records are the members
  (pods), re-read every `discovery_interval` s (serving/upstreams/discovery.py), e.g.
  `{"url": "http://_http._tcp.policy-worker", "discovery": "srv"}`.
- `reward`: `/v1/score` upstreams (feedloop workers `--role reward`). Without it, the gateway has no
  reward model: `/v1/score` answers 503.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.engine.types import Routing

_FORBID = ConfigDict(extra="forbid")


class UpstreamSpec(BaseModel):
    model_config = _FORBID

    url: str = Field(description="Base URL, e.g. http://policy-0:8080")
    kind: Literal["feedloop", "tgi", "openai", "sglang"] = "feedloop"
    model_version: str | None = None
    model: str | None = Field(None, description="Model name for OpenAI-compatible servers.")
    api_key: str | None = Field(None, description="Bearer token for OpenAI-compatible servers.")
    discovery: Literal["dns", "srv"] | None = Field(None, description=(
        "The URL's host is a DNS name standing for the members (a headless Service): `dns` its A/AAAA "
        "records, `srv` its SRV records (port from the record); serving/upstreams/discovery.py."))

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"upstream url must start with http:// or https://; got {v!r}")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _discoverable(self) -> "UpstreamSpec":
        if self.discovery == "srv":
            parts = urlsplit(self.url)
            if parts.port is not None:
                raise ValueError(f"srv discovery takes the port from the SRV records: drop the port from "
                                 f"{self.url} (e.g. http://_http._tcp.policy-worker)")
            if not (parts.hostname or "").startswith("_"):
                raise ValueError(f"srv discovery needs an SRV name such as _http._tcp.policy-worker; got "
                                 f"{parts.hostname!r}")
        return self


class PoolOptions(BaseModel):
    model_config = _FORBID

    request_timeout: float = Field(300.0, gt=0, description="Whole request, first byte to last token.")
    connect_timeout: float = Field(3.0, gt=0)
    read_timeout: float = Field(60.0, gt=0, description="Longest wait for the next token.")
    health_interval: float = Field(2.0, gt=0, description="Seconds between GET /health of each upstream.")
    health_timeout: float = Field(2.0, gt=0)
    max_attempts: int = Field(3, ge=1, description="Upstreams tried per request (retries only before a token).")
    breaker_failures: int = Field(3, ge=1, description="Consecutive failures that open an upstream's breaker.")
    breaker_cooldown: float = Field(5.0, gt=0, description="Seconds an open breaker waits before a trial request.")
    discovery_interval: float = Field(5.0, gt=0, description="Seconds between DNS lookups of discovered upstreams.")
    discovery_timeout: float = Field(2.0, gt=0, description="Longest a DNS lookup may take.")
    nameservers: list[str] | None = Field(None, description=(
        "DNS servers (`host` or `host:port`) for discovery; default the system's (/etc/resolv.conf)."))


class RoutingSpec(BaseModel):
    model_config = _FORBID

    serving: str
    canary: str | None = None
    canary_percent: float = 0.0

    def to_routing(self) -> Routing:
        return Routing(self.serving, self.canary, self.canary_percent)


class UpstreamsConfig(BaseModel):
    model_config = _FORBID

    policy: list[UpstreamSpec] = Field(min_length=1)
    reward: list[UpstreamSpec] = Field(default_factory=list)
    tokenizer: str | None = None
    routing: RoutingSpec | None = None
    options: PoolOptions = Field(default_factory=PoolOptions)

    @field_validator("reward")
    @classmethod
    def _reward_kind(cls, v: list[UpstreamSpec]) -> list[UpstreamSpec]:
        for spec in v:
            if spec.kind != "feedloop":
                raise ValueError(f"reward upstreams must be feedloop workers (kind feedloop); "
                                 f"{spec.url} is {spec.kind}")
        return v


def parse_upstreams(value: str) -> UpstreamsConfig:
    """The config from FEEDLOOP_UPSTREAMS: JSON, or `@path` of a JSON file. ValueError when invalid."""
    text = value.strip()
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"FEEDLOOP_UPSTREAMS is not valid JSON: {exc}") from exc
    try:
        return UpstreamsConfig.model_validate(data)
    except Exception as exc:  # pydantic's message names the field
        raise ValueError(f"FEEDLOOP_UPSTREAMS is invalid: {exc}") from exc


def spec_from_pool(pool) -> UpstreamSpec:
    """The UpstreamSpec of a pool registered in the store (feedback/store/pools.py `PoolRecord`); its
    OpenAI key, if any, from the environment variable the pool names (no secrets in the store).
    ValueError (pydantic's) for a record the gateway cannot use."""
    api_key = os.environ.get(pool.api_key_env) if pool.api_key_env else None
    return UpstreamSpec(url=pool.url, kind=pool.kind, model_version=pool.model_version, model=pool.model,
                        api_key=api_key, discovery=pool.discovery)


def pool_spec_problem(url: str, kind: str, model_version: str | None, model: str | None,
                      discovery: str | None) -> str | None:
    """What the gateway would refuse in a pool about to be registered (e.g. an SRV name with a port),
    as one sentence; None if it can use it. Checked before anything is written to the store."""
    try:
        UpstreamSpec(url=url, kind=kind, model_version=model_version, model=model, discovery=discovery)
    except ValueError as exc:
        errors = getattr(exc, "errors", None)
        return "; ".join(e["msg"].removeprefix("Value error, ") for e in errors()) if errors else str(exc)
    return None
