"""A text-generation-inference server (or a feedloop worker, which serves TGI's routes) as an
upstream, through the `text-generation` client.

`text_generation.AsyncClient.generate_stream` opens a new HTTP session per call and does not expose
the answer's headers; a gateway wants pooled keep-alive connections and the `X-Model-Version`
header. `_SessionClient` is the same client with that one method reimplemented on the client's own
types (`Parameters`, `Request`, `StreamResponse`, `parse_error`) over a shared aiohttp session.
"""
from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable

import aiohttp
from text_generation import AsyncClient
from text_generation import errors as tgi_errors
from text_generation.types import Parameters, Request, StreamResponse

from serving.engine.types import SamplingParams, StepOutput, Token
from serving.errors import ValidationError
from serving.upstreams.base import (Upstream, UpstreamGenerationError, UpstreamOverloaded, UpstreamTimeout,
                                    UpstreamUnavailable)


class _StatusError(Exception):
    """A non-200 answer before the stream: the status and the client's own exception for it."""

    def __init__(self, status: int, error: Exception) -> None:
        super().__init__(f"{status}: {error}")
        self.status = status
        self.error = error


class _SessionClient(AsyncClient):
    """`text_generation.AsyncClient` over one shared aiohttp session (keep-alive), reporting headers."""

    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(base_url, headers=headers, timeout=int(math.ceil(read_timeout)))
        self.timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self.headers, cookies=self.cookies, timeout=self.timeout,
                                                  connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def generate_stream_with_headers(self, prompt: str, parameters: Parameters,
                                           on_headers: Callable[[dict], None],
                                           extra_headers: dict[str, str] | None = None,
                                           ) -> AsyncIterator[tuple[StreamResponse, dict]]:
        request = Request(inputs=prompt, stream=True, parameters=parameters)
        async with self.session().post(self.base_url, json=request.dict(), headers=extra_headers) as resp:
            if resp.status != 200:
                try:
                    payload = await resp.json(content_type=None)
                except (json.JSONDecodeError, aiohttp.ContentTypeError, UnicodeDecodeError):
                    payload = {"error": (await resp.text())[:500] or resp.reason or "", "error_type": ""}
                if not isinstance(payload, dict):
                    payload = {"error": str(payload)[:500]}
                raise _StatusError(resp.status, tgi_errors.parse_error(resp.status, payload))
            on_headers(dict(resp.headers))
            async for line in resp.content:  # server-sent events, as AsyncClient parses them
                if line == b"\n" or not line.startswith(b"data:"):
                    continue
                payload = json.loads(line[len(b"data:"):])
                try:
                    event = StreamResponse(**payload)
                except Exception:  # not a token event: an error event
                    raise tgi_errors.parse_error(resp.status, payload) from None
                yield event, payload  # the raw event too: TGI's details carry input_length


def tgi_parameters(params: SamplingParams) -> Parameters:
    """Our SamplingParams in TGI's terms (TGI refuses temperature <= 0 and top_p >= 1)."""
    if params.ignore_eos:
        raise ValidationError("`ignore_eos` is not supported by TGI upstreams")
    sampling = not params.greedy
    try:
        return _parameters(params, sampling)
    except tgi_errors.ValidationError as exc:  # the client's own checks of TGI's ranges
        raise ValidationError(str(exc)) from None


def _parameters(params: SamplingParams, sampling: bool) -> Parameters:
    return Parameters(
        best_of=None, details=True, decoder_input_details=False, do_sample=sampling,
        max_new_tokens=params.max_new_tokens, repetition_penalty=params.repetition_penalty,
        frequency_penalty=None, return_full_text=False, seed=params.seed, stop=list(params.stop),
        temperature=params.temperature if sampling and params.temperature != 1.0 else None,
        top_k=params.top_k if sampling else None,
        top_p=params.top_p if sampling and params.top_p is not None and params.top_p < 1.0 else None,
        truncate=None, typical_p=None, watermark=False, top_n_tokens=None, grammar=None)


class TGIUpstream(Upstream):
    """TGI's `/generate_stream` (via `POST /` with `stream: true`, as the client does)."""

    kind = "tgi"

    def __init__(self, url: str, model_version: str | None = None, *, connect_timeout: float = 3.0,
                 read_timeout: float = 60.0) -> None:
        super().__init__(url, model_version)
        self.client = _SessionClient(self.url, connect_timeout=connect_timeout, read_timeout=read_timeout)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def generate(self, prompt: str, params: SamplingParams, request_id: str) -> AsyncIterator[StepOutput]:
        parameters = tgi_parameters(params)
        version: list[str | None] = [None]

        def on_headers(headers: dict) -> None:
            v = headers.get("X-Model-Version") or headers.get("x-model-version")
            if v:
                version[0] = v
                if self.kind != "feedloop":  # a worker's answer may come from its canary lane: its
                    self.reported_version = v  # /health (and reload answers) say what it serves

        stream = self.client.generate_stream_with_headers(prompt, parameters, on_headers,
                                                          {"X-Request-Id": request_id})
        streamed = 0
        text = []
        try:
            async for r, raw in stream:
                streamed += 1
                t = r.token
                logprob = t.logprob if t.logprob is not None else -math.inf
                piece = "" if t.special else t.text
                text.append(piece)
                out = StepOutput(Token(t.id, t.text, logprob, t.special), piece,
                                 model_version=version[0] or self.configured_version)
                if r.details is not None:
                    out.finish_reason = r.details.finish_reason.value
                    out.generated_text = r.generated_text if r.generated_text is not None else "".join(text)
                    out.generated_tokens = r.details.generated_tokens
                    out.seed = r.details.seed if r.details.seed is not None else params.seed
                    out.prompt_tokens = int((raw.get("details") or {}).get("input_length") or 0)
                yield out
                if r.details is not None:
                    return
            raise UpstreamGenerationError(f"upstream {self.url} ended the stream without a final token "
                                          f"(after {streamed} tokens)")
        except _StatusError as exc:
            raise self._status_error(exc) from None
        except (tgi_errors.GenerationError, tgi_errors.IncompleteGenerationError, tgi_errors.OverloadedError,
                tgi_errors.ValidationError, tgi_errors.UnknownError) as exc:  # an error event mid-stream
            raise UpstreamGenerationError(f"upstream {self.url} failed mid-answer after {streamed} tokens: "
                                          f"{exc}") from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnavailable(f"upstream {self.url} cannot be reached: {exc}") from None
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout(f"upstream {self.url} timed out after {streamed} tokens") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamGenerationError(f"upstream {self.url} lost the connection after {streamed} tokens: "
                                          f"{type(exc).__name__}: {exc}") from None
        finally:
            await stream.aclose()  # closes the response (and its connection) if we stop early

    def _status_error(self, exc: _StatusError) -> Exception:
        msg = f"upstream {self.url} answered {exc.status}: {exc.error}"
        if exc.status == 429:
            return UpstreamOverloaded(msg)
        if exc.status == 503:
            return UpstreamUnavailable(msg)
        if exc.status in (400, 413, 422):
            return ValidationError(str(exc.error))
        return UpstreamGenerationError(msg)
