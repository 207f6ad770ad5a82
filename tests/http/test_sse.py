"""EventStreamResponse closes its event generator (and so the engine request) the moment the client
leaves, even when the answer is stuck in a send to a client that stopped reading."""
from __future__ import annotations

import anyio
import pytest

from serving.http.sse import EventStreamResponse


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_generator_closed_when_client_leaves_during_a_blocked_send(spec_version):
    closed: list[bool] = []

    async def events():
        try:
            yield b"data:1\n\n"
            yield b"data:2\n\n"
        finally:
            closed.append(True)

    first_sent = anyio.Event()

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            first_sent.set()
            await anyio.sleep_forever()  # the socket's buffer is full: the client stopped reading

    async def receive():
        await first_sent.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"spec_version": spec_version}}
    with anyio.fail_after(5):
        await EventStreamResponse(events())(scope, receive, send)
    # Starlette's StreamingResponse would return with the generator still suspended at its first
    # yield (closed == []), leaving the request in the engine until the garbage collector runs.
    assert closed == [True]
