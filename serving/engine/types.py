"""Data that crosses the EngineClient boundary: sampling parameters and streamed outputs.

Kept free of torch so that services, routers and upstream engines can use them without it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from serving.errors import ValidationError

FinishReason = Literal["length", "eos_token", "stop_sequence"]

MAX_STOP_SEQUENCES = 8


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Greedy unless `do_sample` (TGI's switch) or a temperature/top-k/top-p asks.

    `seed` makes sampling reproducible: the same seed, prompt and parameters give the same tokens,
    whatever else is in the batch (each request owns its random generator).
    """

    max_new_tokens: int = 100
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = True
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValidationError("`temperature` must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValidationError("`top_k` must be strictly positive")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
        if self.repetition_penalty is not None and not (
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValidationError("`repetition_penalty` must be strictly positive")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise ValidationError(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in self.stop):
            raise ValidationError("stop sequences must not be empty")
        if self.seed is not None and not (0 <= self.seed < 2**64):
            raise ValidationError("`seed` must be between 0 and 2**64 - 1")

    @property
    def greedy(self) -> bool:
        """True when the argmax is taken: no sampling asked, or temperature 0."""
        return (not self.do_sample) or self.temperature == 0.0


@dataclass(frozen=True)
class Token:
    """One generated token. `logprob` is under the model's raw distribution (before sampling filters)."""

    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class StepOutput:
    """What the engine streams for one request after each decode step.

    `text` is the new piece of generated text (may be '' while a multi-byte character is incomplete).
    The last output of a request has `finish_reason` set and carries the totals.
    """

    token: Token
    text: str
    finish_reason: FinishReason | None = None
    generated_text: str | None = None
    generated_tokens: int = 0
    prompt_tokens: int = 0
    seed: int | None = None
    model_version: str | None = None  # the weights that produced it (set on every output by LocalEngine)


@dataclass(frozen=True)
class Routing:
    """Which model version new requests run on: `serving`, except a `canary_percent` share (drawn at
    random per request) that goes to `canary`. Requests already running keep their version."""

    serving: str
    canary: str | None = None
    canary_percent: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.serving, str) or not self.serving:
            raise ValidationError("`serving` must name a model version")
        if isinstance(self.canary_percent, bool) or not isinstance(self.canary_percent, (int, float)) \
                or not (0.0 <= self.canary_percent <= 100.0):  # NaN fails the comparison too
            raise ValidationError(f"`canary_percent` must be between 0 and 100; got {self.canary_percent!r}")
        if self.canary is None and self.canary_percent != 0:
            raise ValidationError("`canary_percent` needs a `canary` version (none is given)")
        if self.canary is not None and (not isinstance(self.canary, str) or not self.canary):
            raise ValidationError("`canary` must name a model version or be None")
        if self.canary == self.serving:
            raise ValidationError(f"`canary` must differ from `serving` (both are {self.serving!r})")

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions that receive new requests (a canary at 0 % included: it stays loaded)."""
        return (self.serving,) if self.canary is None else (self.serving, self.canary)

    def share(self, version: str) -> float:
        """Percent of new requests that `version` receives."""
        if version == self.canary:
            return float(self.canary_percent)
        return 100.0 - self.canary_percent if version == self.serving else 0.0

    def pick(self, draw: float) -> str:
        """The version for a new request, given a uniform draw in [0, 1)."""
        if self.canary is not None and draw * 100.0 < self.canary_percent:
            return self.canary
        return self.serving

    def as_dict(self) -> dict:
        return {"serving": self.serving, "canary": self.canary, "canary_percent": self.canary_percent}


@dataclass(frozen=True)
class EngineInfo:
    """What /info and /v1/models report about the engine behind a client."""

    model_id: str
    model_version: str
    model_dtype: str
    model_device_type: str
    max_input_tokens: int
    max_total_tokens: int
    max_batch_size: int
    max_queue: int
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ScoreResult:
    scores: list[float]
    model_version: str
