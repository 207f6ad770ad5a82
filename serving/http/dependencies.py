"""What routes take from the app: the Services built at start-up, and names derived from them.

Tests replace the whole Services object (create_app takes it), so there is nothing else to override.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from serving.services import Services


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
