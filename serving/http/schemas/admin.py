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
