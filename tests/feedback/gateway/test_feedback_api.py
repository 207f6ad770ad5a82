"""`POST /v1/feedback`: each kind accepted, published to FEEDBACK keyed by the prompt's key, all or
nothing; every refusal with its status and a message that names the problem."""
from __future__ import annotations

import httpx
import pytest

from feedback.prompt_key import prompt_key
from protos.feedloop.v1 import events_pb2
from tests.feedback.gateway.conftest import recording_services
from tests.http.server import serve_http


def serve_completion(url: str, prompt: str) -> str:
    r = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 3}}, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-completion-id"]


@pytest.fixture(scope="module")
def served(gateway) -> dict[str, list[str]]:
    """Completion ids by prompt: three answers to "fb: one", one to "fb: two"."""
    return {"fb: one": [serve_completion(gateway.url, "fb: one") for _ in range(3)],
            "fb: two": [serve_completion(gateway.url, "fb: two")]}


def post(gateway, body, **headers) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/feedback", json=body, headers=headers, timeout=30)


def published(gateway, event_ids: list[str]) -> list[tuple[bytes, events_pb2.FeedbackEvent]]:
    by_id = {}
    for key, event in gateway.feedback_events():
        by_id.setdefault(getattr(event, event.WhichOneof("event")).meta.event_id, []).append((key, event))
    return [pair for eid in event_ids for pair in by_id.get(eid, [])]


def test_each_kind_is_accepted_and_keyed_by_the_prompt(gateway, served):
    a, b, c = served["fb: one"]
    body = [{"type": "rating", "completion_id": a, "score": 1, "comment": "good"},
            {"type": "comparison", "completion_ids": [a, b], "winner": "b", "user": "eve"},
            {"type": "ranking", "completion_ids": [c, a, b]},
            {"type": "demonstration", "completion_id": a, "text": "a better answer"},
            {"type": "demonstration", "messages": [{"role": "user", "content": "mine"}], "text": "answer"}]
    r = post(gateway, body, **{"X-Feedloop-User": "dan", "X-Feedloop-Tenant": "acme"})
    assert r.status_code == 202, r.text
    ids = r.json()["event_ids"]
    assert r.json()["accepted"] == 5 and len(set(ids)) == 5
    events = published(gateway, ids)  # published before the answer: no waiting
    assert [e.WhichOneof("event") for _, e in events] == ["rating", "comparison", "ranking", "demonstration",
                                                          "demonstration"]
    key = prompt_key("fb: one").encode()
    assert [k for k, _ in events] == [key] * 4 + [prompt_key([{"role": "user", "content": "mine"}]).encode()]
    rating, comparison = events[0][1].rating, events[1][1].comparison
    assert rating.score == 1 and rating.comment == "good" and rating.meta.user == "dan"
    assert rating.meta.tenant == "acme" and rating.meta.schema_version == 1 and rating.meta.time.seconds > 0
    assert comparison.meta.user == "eve" and comparison.winner == events_pb2.Comparison.WINNER_B
    assert (comparison.completion_a, comparison.completion_b) == (a, b) and comparison.comparison_id
    assert list(events[2][1].ranking.completion_ids) == [c, a, b]
    assert events[4][1].demonstration.prompt_chat.messages[0].content == "mine"


def test_client_event_id_passes_through_for_idempotent_retries(gateway, served):
    a = served["fb: two"][0]
    body = {"type": "rating", "completion_id": a, "score": -1, "event_id": "client-retry-1"}
    first, again = post(gateway, body), post(gateway, body)
    assert first.status_code == again.status_code == 202
    assert first.json()["event_ids"] == again.json()["event_ids"] == ["client-retry-1"]
    # Published twice with the same id: the store keeps one row per event_id.
    assert len(published(gateway, ["client-retry-1"])) == 2


def test_demonstration_of_a_plain_prompt_is_keyed_by_that_prompt(gateway):
    r = post(gateway, {"type": "demonstration", "prompt": "never served", "text": "written by hand"})
    assert r.status_code == 202, r.text
    ((key, event),) = published(gateway, r.json()["event_ids"])
    assert key == prompt_key("never served").encode() and event.demonstration.prompt_text == "never served"


def test_unknown_completion_is_404_naming_it(gateway, served):
    before = len(gateway.feedback_events())
    r = post(gateway, [{"type": "rating", "completion_id": served["fb: one"][0], "score": 1},
                       {"type": "rating", "completion_id": "cmpl-nope", "score": 1}])
    assert r.status_code == 404
    error = r.json()["error"]
    assert "cmpl-nope" in error["message"] and error["code"] == "completion_not_found"
    assert error["param"] == "[1].completion_id"
    assert len(gateway.feedback_events()) == before  # all or nothing: the valid first event was not published


@pytest.mark.parametrize("case, message", [
    ("ranking_duplicates", "same completion twice"),
    ("ranking_one", "2 to 9"),
    ("ranking_ten", "2 to 9"),
    ("ranking_two_prompts", "same prompt"),
    ("comparison_two_prompts", "same prompt"),
    ("comparison_same_twice", "two different"),
    ("bad_score", "score"),
    ("bad_winner", "winner"),
    ("unknown_type", "type"),
    ("demonstration_two_targets", "exactly one of"),
    ("empty_list", "at least one"),
    ("too_many", "at most 100"),
    ("unknown_field", "Unrecognized request argument"),
    ("duplicate_event_ids", "appears twice"),
])
def test_bad_feedback_is_422(gateway, served, case, message):
    a, b, c = served["fb: one"]
    other = served["fb: two"][0]
    rating = {"type": "rating", "completion_id": a, "score": 1}
    bodies = {
        "ranking_duplicates": {"type": "ranking", "completion_ids": [a, b, a]},
        "ranking_one": {"type": "ranking", "completion_ids": [a]},
        "ranking_ten": {"type": "ranking", "completion_ids": [a, b, c] * 3 + [other]},
        "ranking_two_prompts": {"type": "ranking", "completion_ids": [a, other]},
        "comparison_two_prompts": {"type": "comparison", "completion_ids": [a, other], "winner": "a"},
        "comparison_same_twice": {"type": "comparison", "completion_ids": [a, a], "winner": "tie"},
        "bad_score": {**rating, "score": 2},
        "bad_winner": {"type": "comparison", "completion_ids": [a, b], "winner": "c"},
        "unknown_type": {"type": "thumb", "completion_id": a},
        "demonstration_two_targets": {"type": "demonstration", "completion_id": a, "prompt": "p", "text": "t"},
        "empty_list": [],
        "too_many": [rating] * 101,
        "unknown_field": {**rating, "stars": 5},
        "duplicate_event_ids": [{**rating, "event_id": "x"}, {**rating, "event_id": "x"}],
    }
    before = len(gateway.feedback_events())
    r = post(gateway, bodies[case])
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert message in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert len(gateway.feedback_events()) == before


def test_without_a_publisher_feedback_is_503(tiny_services):
    services = recording_services(tiny_services, None)
    with serve_http(services) as url:
        r = httpx.post(url + "/v1/feedback", json={"type": "demonstration", "prompt": "p", "text": "t"})
    assert r.status_code == 503 and "no event bus" in r.json()["error"]["message"]
