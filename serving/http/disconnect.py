"""Cancel a whole-answer generation when its client goes away before the answer is ready.

Streaming answers notice a disconnect through EventStreamResponse; a non-streaming route is still
inside `await generation.complete(...)` then, and nothing would stop it: a client that timed out
(and perhaps retried) would keep its batch slot until the last token. vLLM does the same
(`with_cancellation`).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from fastapi import Request, Response

T = TypeVar("T")

# nginx's "client closed request": never seen by the client, but logged by the server.
CLIENT_CLOSED = 499


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T | Response:
    """Await `work()`; if the client disconnects first, cancel it (the engine frees the slot) and
    return a 499 response that nobody will read."""
    result: T | Response = Response(status_code=CLIENT_CLOSED)
    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            # The body is already read, so the next message on the channel is the disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result = await work()
        except Exception as exc:  # raised after the group, unwrapped: the error handlers map it
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result
