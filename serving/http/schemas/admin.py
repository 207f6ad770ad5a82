"""Bodies of the admin routes (`/v1/admin/...`): registry changes asked for over HTTP."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_FORBID = ConfigDict(extra="forbid")
Reason = Field("", max_length=2000, description="Why: kept in the registry's audit log.")


class PromoteRequest(BaseModel):
    model_config = _FORBID
    reason: str = Reason


class CanaryRequest(BaseModel):
    model_config = _FORBID
    percent: float = Field(gt=0, le=100, description="Share of new requests sent to the candidate, in (0, 100].")
    reason: str = Reason


class RollbackRequest(BaseModel):
    model_config = _FORBID
    role: Literal["policy", "reward"] = Field(description="Which deployment to roll back.")
    reason: str = Reason
    expected: str | None = Field(None, max_length=256, description="Only roll back if this version is the "
                                 "serving or canary version now (a no-op otherwise).")


class DeploymentOut(BaseModel):
    role: str
    serving_version: str
    canary_version: str | None
    canary_percent: float
    revision: int
    updated_at: str


class ChangeResponse(BaseModel):
    deployment: DeploymentOut


class PoolRequest(BaseModel):
    """An upstream pool to register (feedback/store/pools.py); gateways follow it at their next poll."""

    model_config = _FORBID
    name: str = Field(max_length=64, description="A DNS label, e.g. tgi-v3 (pools are immutable).")
    url: str = Field(max_length=512, description="Base URL; with `discovery`, the headless Service's name.")
    kind: Literal["feedloop", "tgi", "openai", "sglang"]
    role: Literal["policy", "reward"] = "policy"
    model_version: str | None = Field(None, max_length=256, description="What its servers serve (required for "
                                      "tgi and openai, which do not say).")
    discovery: Literal["dns", "srv"] | None = None
    model: str | None = Field(None, max_length=256, description="Model name OpenAI-compatible servers expect.")
    api_key_env: str | None = Field(None, max_length=128, description="The gateways' environment variable "
                                    "holding the server's API key (keys are never stored).")
    reason: str = Reason
