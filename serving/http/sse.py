"""Server-sent events that free the engine's batch slot as soon as the client goes away."""
from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from functools import partial

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def sse_data(payload: dict | str, *, space: bool = False) -> bytes:
    """One `data:` event. TGI writes `data:{json}`, OpenAI `data: {json}`; clients of each parse
    their own server's bytes, so each family keeps its spelling."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"),
                                                                 ensure_ascii=False)
    return f"data:{' ' if space else ''}{text}\n\n".encode()


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` answer whose event generator is always closed, at once, when the
    answer ends for any reason: finished, client disconnected, or server shutting down.

    Starlette's StreamingResponse stops iterating on a disconnect but leaves the generator suspended
    until the garbage collector finalises it; the generator's `finally` (which cancels the request in
    the engine) would then run late or never. Here it runs in a shielded scope before returning.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], headers: dict[str, str] | None = None,
                 status_code: int = 200) -> None:
        # no-cache / no buffering: proxies must pass each token on as it comes
        super().__init__(events, status_code, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                       **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def run_then_cancel(func) -> None:
                    await func()
                    tg.cancel_scope.cancel()

                tg.start_soon(run_then_cancel, partial(self.stream_response, send))
                # Watching the receive channel catches a disconnect even between two tokens.
                await run_then_cancel(partial(self.listen_for_disconnect, receive))
        except OSError:  # the socket broke under a send: same as a disconnect
            pass
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
