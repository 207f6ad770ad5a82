"""Schemathesis against the served OpenAPI spec (in-process ASGI, FakeEngine): whatever the body,
the answer is never a 5xx. The spec describes every request body, so cases reach the parameter
checks and the engine, not only the JSON parser."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import schemathesis
from schemathesis.checks import not_a_server_error

from serving.http.app import create_app
from tests.fakes import MemoryPublisher
from tests.http.server import fake_services


# Built at import: schemathesis' fixture-based loader relies on a pytest internal that pytest 9
# removed. Nothing is written under the data dir. A publisher so that /v1/feedback can accept events.
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(
    fake_services(Path(tempfile.gettempdir()), publisher=MemoryPublisher())))
# Small and derandomised: a smoke test that stays fast and repeatable, not an exhaustive search.
# FEEDLOOP_FUZZ_EXAMPLES raises the count for a longer hunt by hand.
schema.config.generation.update(max_examples=int(os.environ.get("FEEDLOOP_FUZZ_EXAMPLES", "20")),
                                deterministic=True, database="none")


@schema.parametrize()
def test_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error])


def test_spec_describes_the_request_bodies():
    spec = schema.raw_schema
    for path in ("/generate", "/generate_stream", "/", "/v1/chat/completions", "/v1/completions", "/v1/score",
                 "/v1/compare"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].startswith("#/components/schemas/"), path
    params = spec["components"]["schemas"]["Parameters"]
    assert params["additionalProperties"] is False
    assert {"max_new_tokens", "temperature", "stop", "details", "seed"} <= set(params["properties"])
