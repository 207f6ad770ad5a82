"""The EngineClient interface the services call; the in-process engine and upstreams implement it."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from serving.engine.types import EngineInfo, SamplingParams, ScoreResult, StepOutput


class EngineClient(ABC):
    """A policy model that generates. Implementations: LocalEngineClient (in-process torch)."""

    @property
    @abstractmethod
    def model_version(self) -> str:
        """Version of the weights that new requests run on (the serving version; a canary share of
        requests may run on another: each output's `model_version` says which)."""

    @abstractmethod
    def info(self) -> EngineInfo: ...

    @abstractmethod
    def render_chat(self, messages: list[dict]) -> str:
        """Apply the model's chat template (with the generation prompt) to OpenAI-style messages."""

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    def generate(self, prompt: str, params: SamplingParams, request_id: str,
                 model_version: str | None = None) -> AsyncIterator[StepOutput]:
        """Stream the outputs of one request. Raises Overloaded when the queue is full (before the
        first output), ValidationError for prompts over the limits or a `model_version` that is not
        loaded. Closing the iterator early (client disconnect) cancels the request and frees its
        batch slot.

        `model_version` None lets the engine choose (its routing: serving version or canary); the
        version is fixed when the request is queued and every output says it in `model_version`.
        Engines that serve one version may leave `model_version` None on outputs and omit the
        argument (callers pass it only when a version is named)."""

    @abstractmethod
    def stats(self) -> dict:
        """Live numbers: queue size and running batch size."""

    def check_health(self) -> None:
        """Raise EngineUnavailable unless new requests can be served (starting, stopped, crashed)."""

    async def start(self) -> None:  # pragma: no cover - default no-op
        """Start background work (the decode loop)."""

    async def stop(self) -> None:  # pragma: no cover - default no-op
        """Stop background work; pending requests fail with EngineUnavailable."""


class RewardClient(ABC):
    """A reward model that scores (prompt, response) pairs."""

    @property
    @abstractmethod
    def model_version(self) -> str: ...

    @property
    @abstractmethod
    def trained(self) -> bool:
        """False when the scalar head is untrained (initialised from the policy at start-up)."""

    @abstractmethod
    async def score(self, pairs: list[tuple[str | list[dict], str]]) -> ScoreResult:
        """Score each (prompt or chat messages, response) pair; higher is better."""

    async def start(self) -> None:  # pragma: no cover
        ...

    async def stop(self) -> None:  # pragma: no cover
        ...
