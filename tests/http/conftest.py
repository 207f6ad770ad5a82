"""Fixtures of the HTTP tests.

`policy_services` is the seam between engines: the real-client tests run on the real engine with a
tiny model (`tiny_services` from tests/conftest.py). FakeEngine serves the cases the real engine
cannot be made to produce on demand: a full queue, a slow stream, a failure mid-stream.
"""
from __future__ import annotations

import pytest

from serving.services import Services
from tests.http.server import fake_services, serve_http


@pytest.fixture(scope="module")
def policy_services(tiny_services) -> Services:
    """The services behind the real-client tests: the real engine on the tiny model."""
    return tiny_services


@pytest.fixture(scope="module")
def policy_url(policy_services) -> str:
    with serve_http(policy_services) as url:
        yield url


@pytest.fixture(scope="module")
def fake_url(tmp_path_factory) -> str:
    """A server over FakeEngine (capacity 4, prompts up to 64 words, 4096-byte bodies)."""
    with serve_http(fake_services(tmp_path_factory.mktemp("fake"))) as url:
        yield url
