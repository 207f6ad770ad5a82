"""The generation service: one place where every served answer gets its completion id and model
version, its metrics, and its CompletionServed event on the feedback bus. HTTP and gRPC both call it.

What is recorded: answers that finished (eos, stop sequence or length), the moment their last token
is produced — before it is handed to the transport, so feedback sent right after the answer finds
the completion in the index. Answers cancelled mid-way (client gone) or failed are not recorded:
nobody saw a whole answer, so there is nothing to give feedback on or to train from.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from feedback import topics
from serving.engine.client import EngineClient
from serving.engine.types import FinishReason, SamplingParams, StepOutput, Token
from serving.errors import GenerationError
from serving.metrics import ServingMetrics
from serving.services.completion_events import RequestRecord, completion_served
from serving.services.completion_index import CompletionIndex, ServedCompletion
from serving.services.recorder import EventRecorder


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
    """A started answer: the id and version are known before the first token is sent (headers need
    them). `model_version` is the version the request runs on, which may be a canary's."""

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
    """`recorder` None: nothing is published (tests, tools). `index` None: nothing is remembered."""

    def __init__(self, engine: EngineClient, metrics: ServingMetrics, recorder: EventRecorder | None = None,
                 index: CompletionIndex | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.recorder = recorder
        self.index = index

    async def stream(self, prompt: str, params: SamplingParams, record: RequestRecord | None = None,
                     model_version: str | None = None) -> CompletionStream:
        """Start generating. Errors that concern the whole request (validation, overload, unknown
        model version) are raised here, before anything is sent, so each transport can answer them
        with a status code; so is a GenerationError of a request that failed before its first token
        (counted as outcome `error` under the version it ran on — the error's `model_version` when
        the engine says it — while refusals count as `rejected`).

        `prompt` is what the engine reads (chat already rendered); `record` says what the completion's
        event records (the prompt as the user sent it, user, tenant, comparison). `model_version`
        None lets the engine's routing choose (serving version or canary)."""
        completion_id = new_completion_id()
        # Passed only when named, so engines that serve a single version need not take the argument.
        kwargs = {} if model_version is None else {"model_version": model_version}
        raw = self.engine.generate(prompt, params, completion_id, **kwargs)
        # Pull the first output now: overload and validation errors surface before any byte is sent,
        # and the first output says which version the request runs on (fixed when it was queued).
        start = time.perf_counter()
        try:
            first = await raw.__anext__()
        except StopAsyncIteration:  # pragma: no cover - engines always send at least one output
            raise
        except GenerationError as exc:
            # Queued, then failed before its first token (its prefill raised): a failed request of
            # the version it was routed to, which the engine's error names (the deployment watcher
            # rolls a version back on these). Not a refusal.
            failed_on = getattr(exc, "model_version", None) or model_version or self.engine.model_version
            self.metrics.requests.labels(failed_on, "error").inc()
            await raw.aclose()
            raise
        except BaseException:  # refused before it started: validation, overload, engine stopped
            self.metrics.requests.labels(model_version or self.engine.model_version, "rejected").inc()
            await raw.aclose()
            raise
        version = first.model_version or self.engine.model_version
        self.metrics.time_to_first_token.labels(version).observe(time.perf_counter() - start)
        served = _Served(completion_id, version, prompt, params, record or RequestRecord())
        return CompletionStream(completion_id, version, self._observe(first, raw, start, served))

    async def _observe(self, first: StepOutput, raw: AsyncIterator[StepOutput], start: float,
                       served: "_Served") -> AsyncIterator[StepOutput]:
        version = served.model_version
        last = first
        outcome = "cancelled"
        try:
            if first.finish_reason is not None:
                self._finished(served, first)
            yield first
            if first.finish_reason is None:
                async for out in raw:
                    last = out
                    if out.finish_reason is not None:
                        self._finished(served, out)
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

    def _finished(self, served: "_Served", last: StepOutput) -> None:
        """Remember the completion and queue its event. Cheap and non-blocking (no hashing, no I/O):
        the event is built on the recorder's thread."""
        prompt = served.record.prompt if served.record.prompt is not None else served.prompt
        if self.index is not None:
            self.index.add(served.completion_id,
                           ServedCompletion(prompt, served.model_version, served.record.comparison_id))
        if self.recorder is not None:
            now = time.time_ns()
            self.recorder.record(topics.COMPLETIONS, lambda: completion_served(
                served.completion_id, served.model_version, prompt, served.record, served.params, last, now))

    async def complete(self, prompt: str, params: SamplingParams, record: RequestRecord | None = None,
                       model_version: str | None = None) -> Completion:
        """Generate the whole answer (on `model_version`, or where the routing sends it)."""
        stream = await self.stream(prompt, params, record, model_version)
        tokens: list[Token] = []
        last = None
        async for out in stream:
            tokens.append(out.token)
            last = out
        assert last is not None and last.finish_reason is not None
        return Completion(stream.completion_id, stream.model_version, last.generated_text or "",
                          tokens, last.finish_reason, last.prompt_tokens, last.seed)


@dataclass(frozen=True)
class _Served:
    """What the completion's event needs besides the engine's last output."""

    completion_id: str
    model_version: str
    prompt: str
    params: SamplingParams
    record: RequestRecord
