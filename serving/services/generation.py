"""The generation service: one place where every served answer gets its completion id and model
version, its metrics, and (later) its event on the feedback bus. HTTP and gRPC both call it."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from serving.engine.client import EngineClient
from serving.engine.types import FinishReason, SamplingParams, StepOutput, Token
from serving.metrics import ServingMetrics


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


@dataclass
class Completion:
    """A finished answer."""

    completion_id: str
    model_version: str
    text: str
    tokens: list[Token]
    finish_reason: FinishReason
    prompt_tokens: int
    seed: int | None


@dataclass
class CompletionStream:
    """A started answer: the id and version are known before the first token (headers need them)."""

    completion_id: str
    model_version: str
    outputs: AsyncIterator[StepOutput]
    _closed: bool = field(default=False, repr=False)

    def __aiter__(self) -> AsyncIterator[StepOutput]:
        return self.outputs

    async def aclose(self) -> None:
        """Cancel the request (client went away); frees its batch slot."""
        if not self._closed:
            self._closed = True
            await self.outputs.aclose()


class GenerationService:
    def __init__(self, engine: EngineClient, metrics: ServingMetrics) -> None:
        self.engine = engine
        self.metrics = metrics

    async def stream(self, prompt: str, params: SamplingParams) -> CompletionStream:
        """Start generating. Errors that concern the whole request (validation, overload) are raised
        here, before anything is sent, so each transport can answer them with a status code."""
        completion_id = new_completion_id()
        version = self.engine.model_version
        raw = self.engine.generate(prompt, params, completion_id)
        # Pull the first output now: overload and validation errors surface before any byte is sent,
        # and the version is the one the request actually runs on.
        start = time.perf_counter()
        try:
            first = await raw.__anext__()
        except StopAsyncIteration:  # pragma: no cover - engines always send at least one output
            raise
        except BaseException:
            self.metrics.requests.labels(version, "rejected").inc()
            await raw.aclose()
            raise
        self.metrics.time_to_first_token.labels(version).observe(time.perf_counter() - start)
        return CompletionStream(completion_id, version, self._observe(first, raw, start, version))

    async def _observe(self, first: StepOutput, raw: AsyncIterator[StepOutput], start: float,
                       version: str) -> AsyncIterator[StepOutput]:
        last = first
        outcome = "cancelled"
        try:
            yield first
            if first.finish_reason is None:
                async for out in raw:
                    last = out
                    yield out
            outcome = "ok"
        except GeneratorExit:
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            await raw.aclose()
            elapsed = time.perf_counter() - start
            m = self.metrics
            m.requests.labels(version, outcome).inc()
            m.request_duration.labels(version).observe(elapsed)
            if last.finish_reason is not None:
                m.prompt_tokens.labels(version).observe(last.prompt_tokens)
                m.generated_tokens.labels(version).observe(last.generated_tokens)
                if last.generated_tokens > 1:
                    m.time_per_output_token.labels(version).observe(elapsed / last.generated_tokens)

    async def complete(self, prompt: str, params: SamplingParams) -> Completion:
        """Generate the whole answer."""
        stream = await self.stream(prompt, params)
        tokens: list[Token] = []
        last = None
        async for out in stream:
            tokens.append(out.token)
            last = out
        assert last is not None and last.finish_reason is not None
        return Completion(stream.completion_id, stream.model_version, last.generated_text or "",
                          tokens, last.finish_reason, last.prompt_tokens, last.seed)
