"""What every upstream shares: the errors they raise (with whether a retry is safe), the circuit
breaker, and the `Upstream` interface the pool balances over."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable

from serving.engine.types import SamplingParams, StepOutput
from serving.errors import EngineUnavailable, GenerationError, Overloaded


class UpstreamUnavailable(EngineUnavailable):
    """The upstream cannot be reached (connection refused) or answered 503. Nothing was generated:
    another upstream may take the request. Counts against the upstream's breaker."""

    retryable = True
    upstream_fault = True


class UpstreamOverloaded(Overloaded):
    """The upstream answered 429 before generating: another upstream may take the request. Not a
    fault of the upstream (it is healthy, only busy), so the breaker does not count it."""

    retryable = True
    upstream_fault = False


class UpstreamGenerationError(GenerationError):
    """The upstream failed (5xx, 424, a connection lost mid-answer, an error event). Never retried:
    it may already have streamed tokens, or have started work. Counts against the breaker."""

    retryable = False
    upstream_fault = True


class UpstreamTimeout(UpstreamGenerationError):
    """No answer (or no next token) within the timeout."""


def is_retryable(exc: BaseException) -> bool:
    return bool(getattr(exc, "retryable", False))


def is_upstream_fault(exc: BaseException) -> bool:
    return bool(getattr(exc, "upstream_fault", False))


class Upstream(ABC):
    """One inference server. `generate` yields StepOutputs whose `model_version` is what the server
    said (X-Model-Version) or `configured_version`; it raises the errors above, or our
    ValidationError for requests the server refused (never retried, not the server's fault)."""

    kind: str = "?"

    def __init__(self, url: str, model_version: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.configured_version = model_version
        self.reported_version: str | None = None  # learned from answers and /health
        # bumped by every reload this gateway makes: a health check that began before one read the
        # old version and must not overwrite the new one (it would look drifted and be reloaded again)
        self.version_epoch = 0

    @property
    def model_version(self) -> str | None:
        return self.reported_version or self.configured_version

    def reloaded_to(self, version: str | None) -> None:
        """A reload made by this gateway moved the server to `version`."""
        self.reported_version = version
        self.version_epoch += 1

    @abstractmethod
    def generate(self, prompt: str, params: SamplingParams, request_id: str) -> AsyncIterator[StepOutput]: ...

    async def aclose(self) -> None:  # pragma: no cover - default no-op
        """Release connections."""


class CircuitBreaker:
    """Per upstream: `failures` consecutive failures open it (the upstream leaves rotation); after
    `cooldown` seconds one trial request is let through (half-open): success closes it, failure
    opens it for another cooldown."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, failures: int = 3, cooldown: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self.state = self.CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self.trial_in_flight = False
        self.opened_total = 0

    def available(self) -> bool:
        """May a request go to this upstream now? (Does not change the state.)"""
        if self.state == self.CLOSED:
            return True
        if self.state == self.OPEN:
            return self.clock() - self.opened_at >= self.cooldown
        return not self.trial_in_flight

    def acquire(self) -> None:
        """A request was sent (after `available()`): an open breaker past its cool-down turns
        half-open and this request is its trial."""
        if self.state == self.OPEN and self.clock() - self.opened_at >= self.cooldown:
            self.state = self.HALF_OPEN
        if self.state == self.HALF_OPEN:
            self.trial_in_flight = True

    def success(self) -> None:
        self.consecutive = 0
        self.trial_in_flight = False
        self.state = self.CLOSED

    def failure(self) -> None:
        self.consecutive += 1
        self.trial_in_flight = False
        if self.state == self.HALF_OPEN or self.consecutive >= self.threshold:
            if self.state != self.OPEN:
                self.opened_total += 1
            self.state = self.OPEN
            self.opened_at = self.clock()

    def release(self) -> None:
        """The request ended with neither verdict (cancelled by the client, refused as invalid)."""
        self.trial_in_flight = False


class RolloutFailed(RuntimeError):
    """A worker could not be reloaded (unreachable, timeout, 5xx): try again later. `done`: the
    workers already moved (their reload answers)."""

    def __init__(self, url: str, message: str, done: list[dict], code: str = "failed") -> None:
        super().__init__(f"rollout stopped: {url}: {message}")
        self.url, self.reason, self.done, self.code = url, message, done, code


class RolloutRefused(RolloutFailed):
    """A worker refused the version (409; `code`: checksum | load | incompatible): it is never served."""

    def __init__(self, url: str, code: str, message: str, done: list[dict]) -> None:
        super().__init__(url, f"refused ({code}): {message}", done, code)
