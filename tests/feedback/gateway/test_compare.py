"""`POST /v1/compare` and the gRPC Feedback service (Compare, Submit) on the real engine."""
from __future__ import annotations

import grpc
import httpx
import pytest

from feedback.prompt_key import prompt_key
from protos.feedloop.v1 import common_pb2, events_pb2, feedback_service_pb2, feedback_service_pb2_grpc
from tests.feedback.gateway.conftest import grpc_channel


def compare(gateway, **body) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/compare", json=body, timeout=60)


def test_compare_samples_k_distinct_completions_recorded_with_the_comparison_id(gateway):
    messages = [{"role": "user", "content": "compare: pick a colour"}]
    r = compare(gateway, messages=messages, n=3, max_tokens=8, seed=11, user="fay")
    assert r.status_code == 200, r.text
    body = r.json()
    cid, completions = body["comparison_id"], body["completions"]
    assert cid.startswith("cmp-") and len(completions) == 3
    assert len({c["completion_id"] for c in completions}) == 3
    assert len({c["text"] for c in completions}) >= 2  # distinct seeds: the answers differ
    assert {c["model_version"] for c in completions} == {gateway.services.engine.model_version}
    events = [gateway.served(c["completion_id"])[0] for c in completions]
    assert [e.response for e in events] == [c["text"] for c in completions]
    assert {e.comparison_id for e in events} == {cid}
    assert [e.parameters.seed for e in events] == [11, 12, 13]  # reproducible
    assert all(e.parameters.do_sample and e.meta.user == "fay" for e in events)
    assert {e.prompt_key for e in events} == {prompt_key(messages)}

    # A comparison of two of them without an id gets the compare call's id.
    a, b = completions[0]["completion_id"], completions[1]["completion_id"]
    fb = httpx.post(gateway.url + "/v1/feedback", json={"type": "comparison", "completion_ids": [a, b],
                                                         "winner": "both_bad"}, timeout=30)
    assert fb.status_code == 202, fb.text
    (event,) = [e for _, e in gateway.feedback_events()
                if e.comparison.meta.event_id == fb.json()["event_ids"][0]]
    assert event.comparison.comparison_id == cid


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "n": 1}, "between 2 and 9"),
    ({"prompt": "x", "n": 10}, "between 2 and 9"),
    ({"prompt": "x", "temperature": 0}, "temperature"),
    ({"prompt": "x", "model_versions": ["other-v9"]}, "'other-v9'"),
    ({"n": 2}, "exactly one of `prompt` or `messages`"),
])
def test_bad_compare_requests_are_422(gateway, body, message):
    r = compare(gateway, **body)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]["message"]


async def test_grpc_compare_then_submit(gateway):
    async with grpc_channel(gateway.services) as channel:
        stub = feedback_service_pb2_grpc.FeedbackStub(channel)
        reply = await stub.Compare(feedback_service_pb2.CompareRequest(
            text="grpc compare:", n=2, parameters=common_pb2.SamplingParameters(max_new_tokens=4)))
        assert reply.comparison_id and len(reply.completions) == 2
        a, b = (c.completion_id for c in reply.completions)
        assert {e.comparison_id for e in gateway.served(a) + gateway.served(b)} == {reply.comparison_id}

        ranking = events_pb2.FeedbackEvent(ranking=events_pb2.Ranking(
            meta=events_pb2.EventMeta(event_id="grpc-rank-1"), completion_ids=[b, a]))
        rating = events_pb2.FeedbackEvent(rating=events_pb2.Rating(completion_id=a, score=-1))
        submitted = await stub.Submit(feedback_service_pb2.SubmitRequest(events=[ranking, rating]),
                                      metadata=(("x-feedloop-user", "gil"),))
        assert submitted.accepted == 2 and submitted.event_ids[0] == "grpc-rank-1"
        by_id = {getattr(e, e.WhichOneof("event")).meta.event_id: (k, e) for k, e in gateway.feedback_events()}
        key, event = by_id["grpc-rank-1"]
        assert key == prompt_key("grpc compare:").encode() and event.ranking.meta.user == "gil"
        assert by_id[submitted.event_ids[1]][1].rating.score == -1

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Submit(feedback_service_pb2.SubmitRequest(events=[events_pb2.FeedbackEvent(
                rating=events_pb2.Rating(completion_id="cmpl-missing", score=1))]))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "cmpl-missing" in missing.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Submit(feedback_service_pb2.SubmitRequest(events=[events_pb2.FeedbackEvent(
                ranking=events_pb2.Ranking(completion_ids=[a, a]))]))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "twice" in bad.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as one:
            await stub.Compare(feedback_service_pb2.CompareRequest(text="x", n=12))
        assert one.value.code() == grpc.StatusCode.INVALID_ARGUMENT
