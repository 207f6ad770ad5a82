"""What routes take from the app: the Services built at start-up, and names derived from them.

Tests replace the whole Services object (create_app takes it), so there is nothing else to override.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from serving.services import Services
from serving.services.completion_events import RequestRecord

USER_HEADER = "X-Feedloop-User"
TENANT_HEADER = "X-Feedloop-Tenant"


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def served_model_name(services: Services) -> str:
    """The `model` of OpenAI answers and the id in /v1/models: the configured name, else the name of
    the policy's checkpoint directory (model_id may be a full path)."""
    if services.settings.served_model_name:
        return services.settings.served_model_name
    model_id = services.engine.info().model_id
    return Path(model_id).name or model_id


def completion_headers(completion_id: str, model_version: str) -> dict[str, str]:
    return {"X-Completion-Id": completion_id, "X-Model-Version": model_version}


def request_record(request: Request, prompt: str | list[dict], user: str | None = None) -> RequestRecord:
    """What a served completion's event records about its request: the prompt as the user sent it
    (text, or chat messages before the template), the user (the body's `user` field where the API has
    one, else the X-Feedloop-User header) and the tenant (X-Feedloop-Tenant). No auth yet: both are
    recorded as sent."""
    headers = request.headers
    return RequestRecord(prompt, user=user or headers.get(USER_HEADER, ""), tenant=headers.get(TENANT_HEADER, ""))
