"""Simulated users: concurrent people who chat with the gateway through its public HTTP API and give
feedback by a preference rule (simulate.judge), as a real app's users would.

Each interaction ends in one feedback event (or an error):
- comparison: POST /v1/compare (n=2) → judge → POST /v1/feedback {"type": "comparison"};
- ranking:    POST /v1/compare (n=K) → rank  → POST /v1/feedback {"type": "ranking"};
- rating:     POST /v1/chat/completions → thumb → POST /v1/feedback {"type": "rating"}.
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from simulate.api import ApiCallFailed, RetryPolicy, check_base_url, post_json
from simulate.judge import Judge
from simulate.prompts import DEFAULT_PROMPTS, Prompt, as_messages, check_prompts, rule_text
from simulate.report import FeedbackRecord, SimulationReport
from simulate.rules import PreferenceRule, RuleError

# Mix keys as the CLI spells them → the feedback kind they produce.
MIX_KINDS = {"compare": "comparison", "rank": "ranking", "rate": "rating"}


@dataclass(frozen=True)
class Mix:
    """Shares of interactions by kind (normalised; need not sum to 1)."""
    compare: float = 1.0
    rank: float = 0.0
    rate: float = 0.0

    def __post_init__(self):
        shares = (self.compare, self.rank, self.rate)
        if any(s < 0 for s in shares) or sum(shares) <= 0:
            raise ValueError("mix shares must be >= 0 and not all 0")

    @classmethod
    def parse(cls, text: str) -> "Mix":
        """"compare=0.7,rank=0.1,rate=0.2" (kinds left out get 0)."""
        shares: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in MIX_KINDS:
                raise ValueError(f"bad mix entry {part!r}: expected compare=X, rank=X or rate=X")
            try:
                shares[name] = float(value)
            except ValueError:
                raise ValueError(f"bad mix entry {part!r}: {value.strip()!r} is not a number") from None
        if not shares:
            raise ValueError("empty mix: give e.g. compare=0.7,rank=0.1,rate=0.2")
        return cls(**{name: shares.get(name, 0.0) for name in MIX_KINDS})

    def choose(self, rng: random.Random) -> str:
        """A feedback kind drawn by the shares."""
        return rng.choices(list(MIX_KINDS.values()), weights=[self.compare, self.rank, self.rate])[0]


@dataclass
class SimulationConfig:
    users: int = 4
    noise: float = 0.0
    events: int | None = None       # stop after this many interactions (each: one feedback event or one error)
    duration_s: float | None = None  # or after this long (interactions under way finish)
    mix: Mix = field(default_factory=Mix)
    prompts: Sequence[Prompt] = DEFAULT_PROMPTS
    seed: int = 0
    rank_k: int = 3                  # answers per ranking (2 to 9, as /v1/compare allows)
    threshold: float = 0.0           # rating: thumb up when the rule's score is above this
    max_new_tokens: int = 16
    temperature: float = 1.0
    chat: bool = True                # string prompts go to /v1/compare as one user message; False: as raw text
    request_timeout_s: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self):
        if self.users < 1:
            raise ValueError("users must be >= 1")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be between 0 and 1, got {self.noise}")
        if self.events is None and self.duration_s is None:
            raise ValueError("give a stopping rule: a number of events or a duration")
        if self.events is not None and self.events < 1:
            raise ValueError("events must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration must be > 0 seconds")
        if not 2 <= self.rank_k <= 9:
            raise ValueError("rank_k must be between 2 and 9")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not 0 < self.temperature <= 2:
            raise ValueError("temperature must be > 0 and <= 2 (comparisons are sampled)")
        self.prompts = check_prompts(self.prompts)


class SimulatedUsers:
    """`await SimulatedUsers(url, rule, config).run()` → SimulationReport. `stop()` ends it early."""

    def __init__(self, url: str, rule: PreferenceRule, config: SimulationConfig, *,
                 on_progress: Callable[[SimulationReport], None] | None = None, progress_every_s: float = 1.0):
        self.url, self.rule, self.config = check_base_url(url), rule, config
        self.on_progress, self.progress_every_s = on_progress, progress_every_s
        self.report = SimulationReport()
        self._claimed = 0
        self._deadline = float("inf")
        self._stopping = False
        self._fatal: BaseException | None = None

    def stop(self) -> None:
        """Start no new interaction (those under way finish)."""
        self._stopping = True

    def _claim(self) -> bool:
        """One more interaction, if the stopping rule allows it (one event loop: no lock needed)."""
        if self._stopping or time.monotonic() >= self._deadline:
            return False
        if self.config.events is not None and self._claimed >= self.config.events:
            return False
        self._claimed += 1
        return True

    async def run(self) -> SimulationReport:
        cfg = self.config
        started = time.monotonic()
        if cfg.duration_s is not None:
            self._deadline = started + cfg.duration_s
        limits = httpx.Limits(max_connections=cfg.users * 2, max_keepalive_connections=cfg.users * 2)
        async with httpx.AsyncClient(base_url=self.url, timeout=cfg.request_timeout_s, limits=limits) as client:
            ticker = asyncio.create_task(self._tick(started))
            try:
                await asyncio.gather(*(self._user(client, i) for i in range(cfg.users)))
            finally:
                ticker.cancel()
                self.report.elapsed_s = time.monotonic() - started
        if self._fatal is not None:
            raise self._fatal
        if self.on_progress is not None:
            self.on_progress(self.report)
        return self.report

    async def _tick(self, started: float) -> None:
        while self.on_progress is not None:
            await asyncio.sleep(self.progress_every_s)
            self.report.elapsed_s = time.monotonic() - started
            self.on_progress(self.report)

    async def _user(self, client: httpx.AsyncClient, index: int) -> None:
        cfg = self.config
        rng = random.Random(cfg.seed * 1_000_003 + index)  # each user's own stream: reproducible per user
        judge = Judge(self.rule, cfg.noise, rng, cfg.threshold)
        headers = {"X-Feedloop-User": f"sim-user-{index}"}
        while self._claim():
            kind = cfg.mix.choose(rng)
            prompt = rng.choice(cfg.prompts)
            try:
                await self._interact(client, kind, prompt, judge, rng, headers)
            except ApiCallFailed as exc:
                if exc.reason in ("connect", "transport"):  # the server is away: do not spin on it
                    await asyncio.sleep(cfg.retry.delay(0, rng))
            except RuleError as exc:  # a bug in the user's rule would fail every verdict: stop now
                self._fatal = exc
                self.stop()
            except (KeyError, IndexError, TypeError, ValueError) as exc:  # a 2xx body not in the API's shape
                self.report.add_error(kind, "bad_response", f"unexpected answer from the gateway: {exc!r}")

    async def _post(self, client, path: str, body, rng, headers) -> httpx.Response:
        def retried(status: int) -> None:
            self.report.retries += 1

        try:
            return await post_json(client, path, body, retry=self.config.retry, rng=rng, headers=headers,
                                   on_retry=retried)
        except ApiCallFailed as exc:
            self.report.add_error(path, exc.reason, exc.message)
            raise

    async def _interact(self, client, kind: str, prompt: Prompt, judge: Judge, rng: random.Random,
                        headers: dict[str, str]) -> None:
        cfg = self.config
        text = rule_text(prompt)
        seed = rng.randrange(2**31)  # the answers are reproducible from the report's seed
        if kind == "rating":
            response = await self._post(client, "/v1/chat/completions", {
                "model": "feedloop", "messages": as_messages(prompt), "max_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature, "seed": seed}, rng, headers)
            body = response.json()
            version = response.headers.get("X-Model-Version") or body.get("system_fingerprint") or "unknown"
            self.report.versions[version] += 1
            verdict = judge.rate(text, body["choices"][0]["message"]["content"] or "")
            record = FeedbackRecord(kind, str(uuid.uuid4()), [body["id"]], verdict.score, verdict.rule_score,
                                    verdict.flipped, not verdict.flipped)
            event = {"type": "rating", "completion_id": body["id"], "score": verdict.score}
        else:
            n = 2 if kind == "comparison" else cfg.rank_k
            raw = not cfg.chat and isinstance(prompt, str)
            target = {"prompt": prompt} if raw else {"messages": as_messages(prompt)}
            response = await self._post(client, "/v1/compare", {
                **target, "n": n, "max_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature, "seed": seed}, rng, headers)
            body = response.json()
            completions = body["completions"]
            for c in completions:
                self.report.versions[c["model_version"]] += 1
            ids = [c["completion_id"] for c in completions]
            if kind == "comparison":
                verdict = judge.compare(text, completions[0]["text"], completions[1]["text"])
                record = FeedbackRecord(kind, str(uuid.uuid4()), ids, verdict.winner, verdict.rule_winner,
                                        verdict.flipped, (not verdict.flipped) if verdict.decided else None)
                event = {"type": "comparison", "completion_ids": ids, "winner": verdict.winner,
                         "comparison_id": body["comparison_id"]}
            else:
                ranking = judge.rank(text, [c["text"] for c in completions])
                ranked = [ids[i] for i in ranking.order]
                record = FeedbackRecord(kind, str(uuid.uuid4()), ids, ranked, [ids[i] for i in ranking.rule_order],
                                        ranking.flipped, ranking.agrees)
                event = {"type": "ranking", "completion_ids": ranked}
        # A fresh uuid4 per event, never one from the seeded RNG: a re-run with the same seed must not
        # collide with the first run's events (the store keeps one event per id).
        event["event_id"] = record.event_id
        self.report.add(record)
        await self._post(client, "/v1/feedback", event, rng, headers)
        record.accepted = True
        self.report.accepted[kind] += 1
