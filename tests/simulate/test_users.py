"""Simulated users against a real gateway (tiny engine, real local-log bus): the verdicts that reach
the bus are the rule's, recomputed here from the stored answers, up to the configured noise."""
from __future__ import annotations

import hashlib
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from feedback.prompt_key import prompt_key
from protos.feedloop.v1 import events_pb2
from simulate.api import RetryPolicy
from simulate.rules import RuleError, prefers_longer
from simulate.users import Mix, SimulatedUsers, SimulationConfig
from tests.fakes import MemoryPublisher
from tests.feedback.gateway.conftest import recording_services
from tests.http.server import serve_http
from tests.simulate.conftest import served_prompt_text

_WINNER = {events_pb2.Comparison.WINNER_A: "a", events_pb2.Comparison.WINNER_B: "b",
           events_pb2.Comparison.WINNER_TIE: "tie"}


def by_digest(prompt: str, answer: str) -> float:
    """A rule with ties only between identical answers (1-token answers often tie on length)."""
    return float(int.from_bytes(hashlib.sha256(answer.encode()).digest()[:4], "big"))


def rule_winner(a: events_pb2.CompletionServed, b: events_pb2.CompletionServed, rule=prefers_longer) -> str:
    """The rule's verdict recomputed from the answers as the gateway stored them."""
    sa = rule(served_prompt_text(a), a.response)
    sb = rule(served_prompt_text(b), b.response)
    return "a" if sa > sb else "b" if sb > sa else "tie"


async def simulate(url: str, rule=prefers_longer, **config) -> "SimulatedUsers":
    config.setdefault("max_new_tokens", 2)
    users = SimulatedUsers(url, rule, SimulationConfig(**config))
    await users.run()
    return users


async def test_without_noise_every_published_verdict_is_the_rules(recording_gateway):
    users = await simulate(recording_gateway.url, users=4, events=12, noise=0.0, seed=1,
                           mix=Mix(compare=1, rank=1, rate=1), rank_k=3, threshold=8)
    report = users.report
    assert report.total_errors == 0, report.error_messages
    assert report.total_accepted == report.total_sent == 12
    assert all(report.sent[k] > 0 for k in ("comparison", "ranking", "rating"))  # every kind ran (seeded)
    assert sum(report.noise_flips.values()) == 0 and report.agreement_rate == 1.0

    completions, published = recording_gateway.published([r.event_id for r in report.events])
    assert published.keys() == {r.event_id for r in report.events}
    answers = 0
    for record in report.events:
        event = published[record.event_id]
        kind = event.WhichOneof("event")
        assert kind == record.kind
        if kind == "comparison":
            a, b = (completions[i] for i in (event.comparison.completion_a, event.comparison.completion_b))
            assert _WINNER[event.comparison.winner] == rule_winner(a, b)
            assert event.comparison.comparison_id == a.comparison_id == b.comparison_id != ""
            answers += 2
        elif kind == "ranking":
            ranked = [completions[i] for i in event.ranking.completion_ids]
            assert len(ranked) == 3 and len({c.comparison_id for c in ranked}) == 1
            scores = [prefers_longer(served_prompt_text(c), c.response) for c in ranked]
            assert scores == sorted(scores, reverse=True)  # best first, by the rule
            answers += 3
        else:
            served = completions[event.rating.completion_id]
            expected = 1 if prefers_longer(served_prompt_text(served), served.response) > 8 else -1
            assert event.rating.score == expected and served.comparison_id == ""  # a plain chat answer
            answers += 1
        # Users chat: the default string prompts arrive as one user message, grouped under one key.
        prompt = [{"role": "user", "content": served_prompt_text(completions[record.completion_ids[0]])}]
        assert {completions[i].prompt_key for i in record.completion_ids} == {prompt_key(prompt)}
        assert event.WhichOneof("event") and getattr(event, kind).meta.user.startswith("sim-user-")
    assert report.versions == {recording_gateway.model_version: answers}


async def test_label_noise_flips_about_the_configured_share_and_the_report_says_which(recording_gateway):
    # Raw-text prompts and 1-token answers keep this fast on a busy CPU (the rate is also checked on
    # 20,000 verdicts in test_judge.py); here: the bus holds exactly the flips the report counts.
    events = 80
    users = await simulate(recording_gateway.url, by_digest, users=8, events=events, noise=0.2, seed=7,
                           max_new_tokens=1, chat=False, temperature=2.0)
    report = users.report
    assert report.total_errors == 0, report.error_messages
    completions, published = recording_gateway.published([r.event_id for r in report.events])
    assert len(published) == events

    flipped_on_the_bus, decided = set(), 0
    for event_id, event in published.items():
        a, b = (completions[i] for i in (event.comparison.completion_a, event.comparison.completion_b))
        expected, sent = rule_winner(a, b, by_digest), _WINNER[event.comparison.winner]
        if expected == "tie":
            assert sent == "tie"  # ties are never flipped
            continue
        decided += 1
        if sent != expected:
            flipped_on_the_bus.add(event_id)
    assert flipped_on_the_bus == {r.event_id for r in report.events if r.flipped}
    assert report.noise_flips["comparison"] == len(flipped_on_the_bus)
    assert report.judged["comparison"] == decided and report.ties == events - decided
    assert decided >= 65  # enough decided comparisons for the band below to tell 0.2 from 0 and 0.5
    # Binomial(decided, 0.2): within 4 standard deviations (a false alarm about 1 run in 15,000).
    band = 4 * math.sqrt(decided * 0.2 * 0.8)
    assert abs(len(flipped_on_the_bus) - 0.2 * decided) <= band, (len(flipped_on_the_bus), decided)
    assert report.agreement_rate == pytest.approx(1 - len(flipped_on_the_bus) / decided)


async def test_duration_stops_the_run(recording_gateway):
    users = await simulate(recording_gateway.url, users=2, duration_s=0.5, max_new_tokens=2)
    assert users.report.total_accepted >= 1 and users.report.total_errors == 0


async def test_a_rule_that_raises_stops_the_simulation_with_its_error(recording_gateway):
    def broken(prompt: str, answer: str) -> float:
        raise KeyError("oops")

    users = SimulatedUsers(recording_gateway.url, broken, SimulationConfig(users=2, events=50, max_new_tokens=2))
    with pytest.raises(RuleError, match="the rule raised KeyError"):
        await users.run()
    assert users.report.total_sent == 0


async def test_4xx_is_counted_with_its_message(recording_gateway):
    # The gateway refuses prompts over max_input_tokens (512 here) with 422: a real client error.
    users = await simulate(recording_gateway.url, users=1, events=2, prompts=["word " * 2000])
    report = users.report
    assert report.errors == {"422": 2} and report.total_sent == 0
    assert all(m.startswith("/v1/compare 422:") and "token" in m for m in report.error_messages)


class FlakyPublisher(MemoryPublisher):
    """A disk that fails the first `failures` feedback writes: a fault the real log cannot be made to
    have on demand. The gateway answers those calls 503."""

    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures

    def publish(self, topic, key, value, headers=None) -> None:
        if topic == "feedloop.feedback" and self.failures > 0:
            self.failures -= 1
            raise OSError("disk I/O error")
        super().publish(topic, key, value, headers)


async def test_503_is_retried_with_the_same_event_id(tiny_services):
    publisher = FlakyPublisher(failures=2)
    services = recording_services(tiny_services, publisher)
    try:
        with serve_http(services) as url:
            users = SimulatedUsers(url, prefers_longer, SimulationConfig(
                users=1, events=3, max_new_tokens=2, retry=RetryPolicy(backoff_s=0.01)))
            await users.run()
    finally:
        services.recorder.close(timeout=10)
    report = users.report
    assert report.retries == 2 and report.total_errors == 0 and report.total_accepted == 3
    published = [events_pb2.FeedbackEvent.FromString(v).comparison.meta.event_id
                 for _, v, _ in publisher.on("feedloop.feedback")]
    assert published == [r.event_id for r in report.events]  # each once, under the id first sent


async def test_a_server_that_is_not_a_gateway_gives_errors_not_a_crash():
    class NotAGateway(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"hello": "world"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotAGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        users = await simulate(f"http://127.0.0.1:{server.server_port}", users=1, events=3,
                               mix=Mix(compare=1, rate=1))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    report = users.report
    assert report.errors == {"bad_response": 3} and report.total_sent == 0
    assert all("unexpected answer from the gateway: KeyError" in m for m in report.error_messages)
