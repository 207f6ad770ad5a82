"""The comparison service: K sampled answers to one prompt, for a person to compare or rank.

Each answer is an ordinary completion (recorded as CompletionServed) carrying the comparison's id, so
the feedback that follows can be tied back to the call that produced the candidates.

Model versions: today the gateway serves one policy at a time, so all K answers come from it. A
request that names another version is refused (422) rather than silently answered by the current
one; comparing two versions needs the hot-swap/canary work of a later issue.
"""
from __future__ import annotations

import asyncio
import dataclasses
import secrets
import uuid
from dataclasses import dataclass

from serving.engine.types import SamplingParams
from serving.errors import ValidationError
from serving.services.completion_events import RequestRecord
from serving.services.generation import Completion, GenerationService

MIN_CANDIDATES, MAX_CANDIDATES = 2, 9


@dataclass(frozen=True)
class Comparison:
    comparison_id: str
    completions: list[Completion]


def new_comparison_id() -> str:
    return f"cmp-{uuid.uuid4().hex}"


class ComparisonService:
    def __init__(self, generation: GenerationService) -> None:
        self.generation = generation

    async def compare(self, prompt: str, params: SamplingParams, n: int = 2, record: RequestRecord | None = None,
                      model_versions: list[str] | tuple[str, ...] = ()) -> Comparison:
        """Sample `n` answers concurrently (they share the running batch). `params.seed`, if set, seeds
        the first answer and the others get seed+1, seed+2, … (reproducible); otherwise each gets a
        random seed. Either way every answer has its own seed, so the answers differ."""
        if not MIN_CANDIDATES <= n <= MAX_CANDIDATES:
            raise ValidationError(f"`n` must be between {MIN_CANDIDATES} and {MAX_CANDIDATES}; got {n}")
        if params.greedy:
            raise ValidationError("a comparison needs sampled answers: `temperature` must be > 0")
        current = self.generation.engine.model_version
        other = [v for v in model_versions if v != current]
        if other:
            raise ValidationError(f"this gateway serves model version {current!r} only; comparing versions "
                                  f"({', '.join(map(repr, other))}) is not available yet")
        comparison_id = new_comparison_id()
        record = dataclasses.replace(record or RequestRecord(), comparison_id=comparison_id)
        if params.seed is not None:
            seeds = [(params.seed + i) % 2**64 for i in range(n)]
        else:
            seeds = [secrets.randbits(63) for _ in range(n)]
        tasks = [asyncio.ensure_future(self.generation.complete(
            prompt, dataclasses.replace(params, seed=seed, do_sample=True), record)) for seed in seeds]
        try:
            completions = await asyncio.gather(*tasks)
        except BaseException:
            # One refused or failed (overload, client gone): the comparison fails as a whole and the
            # others stop now rather than holding batch slots for answers nobody will see.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return Comparison(comparison_id, list(completions))
