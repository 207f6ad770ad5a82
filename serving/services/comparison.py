"""The comparison service: K sampled answers to one prompt, for a person to compare or rank.

Each answer is an ordinary completion (recorded as CompletionServed) carrying the comparison's id, so
the feedback that follows can be tied back to the call that produced the candidates.

Model versions: without `model_versions` each answer is routed like any request (the serving
version, or the canary for its share). With `model_versions`, answer i runs on
`model_versions[i % len(model_versions)]` — `["a", "b"]` with n=2 compares version a with version b —
and is recorded with that version. Only versions loaded on this gateway (serving, canary, or one
still draining) can be named; any other is refused with UnknownModelVersion (422) before anything is
generated.
"""
from __future__ import annotations

import asyncio
import dataclasses
import secrets
import uuid
from dataclasses import dataclass

from serving.engine.types import SamplingParams
from serving.errors import UnknownModelVersion, ValidationError
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
        random seed. Either way every answer has its own seed, so the answers differ.

        `model_versions` (at most `n`, each loaded here) assigns answer i to
        `model_versions[i % len(model_versions)]`; empty lets the routing place every answer."""
        if not MIN_CANDIDATES <= n <= MAX_CANDIDATES:
            raise ValidationError(f"`n` must be between {MIN_CANDIDATES} and {MAX_CANDIDATES}; got {n}")
        if params.greedy:
            raise ValidationError("a comparison needs sampled answers: `temperature` must be > 0")
        versions = self._versions(n, list(model_versions))
        comparison_id = new_comparison_id()
        record = dataclasses.replace(record or RequestRecord(), comparison_id=comparison_id)
        if params.seed is not None:
            seeds = [(params.seed + i) % 2**64 for i in range(n)]
        else:
            seeds = [secrets.randbits(63) for _ in range(n)]
        tasks = [asyncio.ensure_future(self.generation.complete(
            prompt, dataclasses.replace(params, seed=seed, do_sample=True), record, version))
            for seed, version in zip(seeds, versions)]
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

    def _versions(self, n: int, named: list[str]) -> list[str | None]:
        """The version each of the `n` answers runs on (None: the routing's pick). Raises
        ValidationError / UnknownModelVersion (422) before anything is queued."""
        if not named:
            return [None] * n
        if len(named) > n:
            raise ValidationError(f"`model_versions` names {len(named)} versions for {n} answers: "
                                  "name at most `n` (answer i runs on model_versions[i % len])")
        engine = self.generation.engine
        listing = getattr(engine, "versions", None)  # engines with several versions (lanes) list them
        loaded = list(listing()) if callable(listing) else [engine.model_version]
        unknown = [v for v in dict.fromkeys(named) if v not in loaded]
        if unknown:
            raise UnknownModelVersion(f"model version(s) {', '.join(map(repr, unknown))} not loaded on this "
                                      f"gateway; loaded: {', '.join(map(repr, loaded))}")
        if not callable(listing):
            return [None] * n  # one version only: it is the one named (such engines take no version)
        return [named[i % len(named)] for i in range(n)]
