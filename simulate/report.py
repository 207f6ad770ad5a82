"""What a simulation did: `SimulationReport` (counts by kind, errors, noise, versions, agreement) and
one `FeedbackRecord` per feedback event sent, so tests and demos can check the published events."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

# Feedback kinds, named as the events' `type` in POST /v1/feedback.
KINDS = ("comparison", "ranking", "rating")
MAX_ERROR_MESSAGES = 20


@dataclass
class FeedbackRecord:
    """One feedback event as sent. `verdict` is what was sent (winner a|b|tie, completion ids best
    first, or a ±1 score); `rule_verdict` what the rule alone said, before noise."""
    kind: str
    event_id: str
    completion_ids: list[str]
    verdict: str | int | list[str]
    rule_verdict: str | int | list[str]
    flipped: bool
    agrees: bool | None  # None: the rule had no preference (a comparison tie)
    accepted: bool = False


@dataclass
class SimulationReport:
    sent: Counter = field(default_factory=Counter)        # kind → /v1/feedback events sent
    accepted: Counter = field(default_factory=Counter)    # kind → of those, answered 202
    errors: Counter = field(default_factory=Counter)      # HTTP status | connect | timeout | transport
    error_messages: list[str] = field(default_factory=list)  # the first few, "route status: message"
    noise_flips: Counter = field(default_factory=Counter)  # kind → verdicts the noise changed
    ties: int = 0                                          # comparisons the rule could not decide
    judged: Counter = field(default_factory=Counter)      # kind → verdicts where the rule had a preference
    agreeing: Counter = field(default_factory=Counter)    # kind → of those, sent as the rule says
    versions: Counter = field(default_factory=Counter)    # model_version → answers seen
    retries: int = 0                                       # 429/503 answers that were retried
    elapsed_s: float = 0.0
    events: list[FeedbackRecord] = field(default_factory=list)

    @property
    def agreement_rate(self) -> float | None:
        """Share of judged verdicts sent as the rule says (1 - noise, in expectation); None before any."""
        judged = sum(self.judged.values())
        return sum(self.agreeing.values()) / judged if judged else None

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_accepted(self) -> int:
        return sum(self.accepted.values())

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    def add_error(self, where: str, reason: str, message: str) -> None:
        self.errors[reason] += 1
        if len(self.error_messages) < MAX_ERROR_MESSAGES:
            self.error_messages.append(f"{where} {reason}: {message}")

    def add(self, record: FeedbackRecord) -> None:
        """Count a verdict about to be sent."""
        self.events.append(record)
        self.sent[record.kind] += 1
        self.noise_flips[record.kind] += record.flipped
        if record.agrees is None:
            self.ties += 1
        else:
            self.judged[record.kind] += 1
            self.agreeing[record.kind] += record.agrees

    def progress_line(self) -> str:
        kinds = ", ".join(f"{k} {self.accepted[k]}" for k in KINDS if self.sent[k])
        rate = self.agreement_rate
        return (f"simulate: {self.elapsed_s:6.1f}s  accepted {self.total_accepted}/{self.total_sent}"
                f"{f' ({kinds})' if kinds else ''}  errors {self.total_errors}  "
                f"agreement {'-' if rate is None else f'{rate:.2f}'}  versions {dict(self.versions)}")

    def to_dict(self, *, include_events: bool = False) -> dict:
        out = {
            "sent": {k: self.sent[k] for k in KINDS}, "accepted": {k: self.accepted[k] for k in KINDS},
            "errors": dict(self.errors), "error_messages": list(self.error_messages),
            "noise_flips": {k: self.noise_flips[k] for k in KINDS}, "ties": self.ties,
            "judged": {k: self.judged[k] for k in KINDS}, "agreement_rate": self.agreement_rate,
            "versions": dict(self.versions), "retries": self.retries, "elapsed_s": round(self.elapsed_s, 3),
        }
        if include_events:
            out["events"] = [asdict(e) for e in self.events]
        return out
