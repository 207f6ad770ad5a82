"""Calling the gateway's public HTTP API the way a well-behaved app does: back off and retry when it
says "later" (429 overloaded, 503 cannot record now), and give up with a readable reason otherwise."""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import httpx

RETRYABLE = (429, 503)


class ApiCallFailed(Exception):
    """A call that did not succeed. `reason` groups errors in reports: the HTTP status ("422"), or
    "connect" / "timeout" / "transport" when no answer came."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


def check_base_url(url: str) -> str:
    """The gateway's base URL without a trailing slash; refuses what httpx could only fail on later."""
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1].strip("/")) == 0:
        raise ValueError(f"the gateway URL must look like http://HOST:PORT, got {url!r}")
    return url.rstrip("/")


def error_message(response: httpx.Response) -> str:
    """The message of an error body in either of the gateway's formats (OpenAI's or TGI's)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return str(body)[:300]


def transport_reason(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    return "transport"


@dataclass
class RetryPolicy:
    max_retries: int = 8
    backoff_s: float = 0.05     # first wait; doubles each retry, with jitter
    max_backoff_s: float = 2.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + rng.random())


async def post_json(client: httpx.AsyncClient, path: str, body, *, retry: RetryPolicy, rng: random.Random,
                    headers: dict[str, str] | None = None, on_retry=None) -> httpx.Response:
    """POST `body` and return the 2xx response. The same body is resent on 429/503, so an event_id
    in it makes a retried /v1/feedback call stored once. Raises ApiCallFailed."""
    for attempt in range(retry.max_retries + 1):
        try:
            response = await client.post(path, json=body, headers=headers)
        except httpx.TransportError as exc:
            raise ApiCallFailed(transport_reason(exc), f"{type(exc).__name__}: {exc}") from None
        if response.status_code in RETRYABLE and attempt < retry.max_retries:
            if on_retry is not None:
                on_retry(response.status_code)
            await asyncio.sleep(retry.delay(attempt, rng))
            continue
        if response.status_code >= 400:
            raise ApiCallFailed(str(response.status_code), error_message(response))
        return response
    raise AssertionError("unreachable")  # the last attempt returns or raises
