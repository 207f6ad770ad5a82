"""Fixtures shared by the feedback tests (bus, ingestor, gateway publishing)."""
from __future__ import annotations

import pytest

from tests.kafka_broker import TansuBroker


@pytest.fixture
def kafka_broker():
    """A fresh Tansu broker on a free 127.0.0.1 port (memory storage), stopped after the test.

    `kafka_broker.url` is the bus URL (`kafka://127.0.0.1:PORT`), `.bootstrap` the host:port;
    `.pause()`/`.resume()` make it unreachable without losing its memory, `.kill()`/`.start()`
    restart it empty on the same port."""
    with TansuBroker() as broker:
        yield broker
