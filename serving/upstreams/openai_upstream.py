"""An OpenAI-compatible server (vLLM, SGLang, a feedloop worker's /v1 routes) as an upstream, through
the `openai` client: the legacy completions API, streamed, with usage in a last chunk.

What OpenAI's stream does not carry: token ids (outputs have id 0), the seed it drew (the request's
seed is reported), and whether "stop" was an eos or a stop sequence (vLLM's `stop_reason` says so
when present: a string is a stop sequence; otherwise "stop" reads as eos). OpenAI servers cut stop
sequences from the text; TGI keeps them — answers through this upstream never contain them.
"""
from __future__ import annotations

import math
from collections.abc import AsyncIterator

import openai

# openai 3.x ships its own copy of httpx as `httpx2`; older releases use httpx itself.
try:
    import httpx2 as _http
except ImportError:  # pragma: no cover
    import httpx as _http

from serving.engine.types import SamplingParams, StepOutput, Token
from serving.errors import ValidationError
from serving.upstreams.base import (Upstream, UpstreamGenerationError, UpstreamOverloaded, UpstreamTimeout,
                                    UpstreamUnavailable)


class OpenAIUpstream(Upstream):
    kind = "openai"

    def __init__(self, url: str, model_version: str | None = None, *, model: str | None = None,
                 api_key: str | None = None, connect_timeout: float = 3.0, read_timeout: float = 60.0) -> None:
        super().__init__(url, model_version)
        self.model = model
        self.client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key or "EMPTY", max_retries=0,
                                         timeout=openai.Timeout(read_timeout, connect=connect_timeout))

    async def aclose(self) -> None:
        await self.client.close()

    async def _model_name(self) -> str:
        if self.model is None:
            models = await self.client.models.list()
            if not models.data:
                raise UpstreamGenerationError(f"upstream {self.url} lists no model on /v1/models")
            self.model = models.data[0].id
        return self.model

    def _request(self, params: SamplingParams) -> dict:
        extra: dict = {}
        if params.top_k is not None and not params.greedy:
            extra["top_k"] = params.top_k
        if params.repetition_penalty is not None:
            extra["repetition_penalty"] = params.repetition_penalty
        if params.ignore_eos:
            extra["ignore_eos"] = True  # vLLM's extension
        body: dict = {"max_tokens": params.max_new_tokens, "temperature": 0.0 if params.greedy else params.temperature,
                      "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0}
        if params.top_p is not None and not params.greedy:
            body["top_p"] = params.top_p
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if extra:
            body["extra_body"] = extra
        return body

    async def generate(self, prompt: str, params: SamplingParams, request_id: str) -> AsyncIterator[StepOutput]:
        streamed = 0
        try:
            model = await self._model_name()
            async with self.client.completions.with_streaming_response.create(
                    model=model, prompt=prompt, extra_headers={"X-Request-Id": request_id},
                    **self._request(params)) as response:
                version = response.headers.get("x-model-version") or None
                if version:
                    self.reported_version = version
                version = version or self.configured_version
                stream = await response.parse()
                pending: list[StepOutput] = []
                text: list[str] = []
                finish = None
                usage = None
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        outs = self._outputs(choice, version)
                        for out in outs:
                            text.append(out.text)
                        if outs:
                            for out in pending:  # all but the newest wait: the last one carries the totals
                                streamed += 1
                                yield out
                            pending = outs
                        if choice.finish_reason is not None:
                            stop_reason = getattr(choice, "stop_reason", None)
                            if choice.finish_reason == "length":
                                finish = "length"
                            else:
                                finish = "stop_sequence" if isinstance(stop_reason, str) else "eos_token"
                if finish is None:
                    raise UpstreamGenerationError(f"upstream {self.url} ended the stream without a finish reason "
                                                  f"(after {streamed} tokens)")
                if not pending:  # finished without any text (e.g. eos at once)
                    pending = [StepOutput(Token(0, "", 0.0, True), "", model_version=version)]
                last = pending[-1]
                last.finish_reason = finish
                last.generated_text = "".join(text)
                last.generated_tokens = usage.completion_tokens if usage is not None else streamed + len(pending)
                last.prompt_tokens = usage.prompt_tokens if usage is not None else 0
                last.seed = params.seed
                for out in pending:
                    streamed += 1
                    yield out
        except openai.APITimeoutError:
            raise UpstreamTimeout(f"upstream {self.url} timed out after {streamed} tokens") from None
        except openai.APIConnectionError as exc:
            if streamed == 0 and isinstance(exc.__cause__, _http.ConnectError):
                raise UpstreamUnavailable(f"upstream {self.url} cannot be reached: {exc.__cause__}") from None
            raise UpstreamGenerationError(f"upstream {self.url} lost the connection after {streamed} tokens: "
                                          f"{exc.__cause__ or exc}") from None
        except openai.APIStatusError as exc:
            raise self._status_error(exc) from None
        except openai.APIError as exc:  # an error event in the stream
            raise UpstreamGenerationError(f"upstream {self.url} failed mid-answer after {streamed} tokens: "
                                          f"{exc.message}") from None
        except (_http.TransportError, _http.StreamError) as exc:
            raise UpstreamGenerationError(f"upstream {self.url} lost the connection after {streamed} tokens: "
                                          f"{type(exc).__name__}: {exc}") from None

    def _outputs(self, choice, version: str | None) -> list[StepOutput]:
        """One output per token when the logprobs name them, else one for the chunk's text."""
        piece = choice.text or ""
        lp = choice.logprobs
        tokens = list(lp.tokens or []) if lp is not None else []
        logprobs = list(lp.token_logprobs or []) if lp is not None else []
        if tokens and len(tokens) == len(logprobs) and "".join(tokens) == piece:
            return [StepOutput(Token(0, t, _lp(p), False), t, model_version=version) for t, p in zip(tokens, logprobs)]
        if not piece:
            return []
        logprob = sum(_lp(p) for p in logprobs) if logprobs else 0.0
        return [StepOutput(Token(0, piece, logprob, False), piece, model_version=version)]

    def _status_error(self, exc: openai.APIStatusError) -> Exception:
        body = exc.body if isinstance(exc.body, dict) else {}
        message = str(body.get("message") or exc.message)
        msg = f"upstream {self.url} answered {exc.status_code}: {message}"
        if exc.status_code == 429:
            return UpstreamOverloaded(msg)
        if exc.status_code == 503:
            return UpstreamUnavailable(msg)
        if exc.status_code in (400, 404, 413, 422):
            return ValidationError(message)
        return UpstreamGenerationError(msg)


def _lp(p) -> float:
    return float(p) if p is not None and math.isfinite(p) else -math.inf
