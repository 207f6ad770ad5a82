"""`POST /v1/compare` and the gRPC Feedback service (Compare, Submit) on the real engine, and
comparisons between two loaded model versions (serving and canary)."""
from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from feedback.prompt_key import prompt_key
from protos.feedloop.v1 import common_pb2, events_pb2, feedback_service_pb2, feedback_service_pb2_grpc
from serving.engine.local import LocalEngineClient, LocalRewardClient
from serving.engine.types import Routing, SamplingParams
from serving.models import load_policy
from serving.services import Services
from tests.fakes import MemoryPublisher
from tests.feedback.gateway.conftest import Gateway, grpc_channel
from tests.http.server import serve_http
from tests.tiny import make_tiny_checkpoint


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


@pytest.fixture(scope="module")
def two_versions(tiny_services, tiny_model_dir, tiny_reward, tmp_path_factory):
    """A recording gateway of its own (the shared engine is left alone) whose engine has two loaded
    versions: the tiny policy serving and another (seed 1) as a 10 % canary."""
    serving = load_policy(tiny_model_dir, device="cpu")
    canary = load_policy(make_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-canary", seed=1),
                         device="cpu")
    s = tiny_services.settings
    engine = LocalEngineClient(serving, max_batch_size=s.max_batch_size, max_queue=s.max_queue,
                               max_input_tokens=s.max_input_tokens, max_total_tokens=s.max_total_tokens)
    engine.add_version(canary)
    engine.set_routing(Routing(serving.model_version, canary=canary.model_version, canary_percent=10))
    publisher = MemoryPublisher()
    services = Services.build(s, engine, LocalRewardClient(tiny_reward, run_job=engine.engine.run_job),
                              publisher=publisher)
    engine.engine.start()
    try:
        with serve_http(services) as url:
            yield Gateway(services, publisher, url), serving.model_version, canary.model_version
    finally:
        engine.engine.stop()
        services.recorder.close()


def _alone(gateway: Gateway, prompt: str, version: str, seed: int, max_new_tokens: int = 8) -> str:
    """The text `version` gives for this prompt and seed, generated on its own (as compare samples)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, seed=seed,
                            logprobs=False)
    return asyncio.run(gateway.services.generation.complete(prompt, params, model_version=version)).text


def test_compare_answers_each_on_the_version_it_names(two_versions):
    gateway, serving, canary = two_versions
    prompt = "compare versions: name a fruit"
    r = compare(gateway, prompt=prompt, n=2, max_tokens=8, seed=5, model_versions=[serving, canary])
    assert r.status_code == 200, r.text
    cid, (a, b) = r.json()["comparison_id"], r.json()["completions"]
    assert (a["model_version"], b["model_version"]) == (serving, canary)
    # each answer is what its version gives with its seed (5, 6), not what the other version gives
    assert a["text"] == _alone(gateway, prompt, serving, 5) and b["text"] == _alone(gateway, prompt, canary, 6)
    assert {_alone(gateway, prompt, canary, 5), _alone(gateway, prompt, serving, 6)}.isdisjoint({a["text"], b["text"]})
    # recorded with the version that generated them, and the comparison's id
    events = [gateway.served(c["completion_id"])[0] for c in (a, b)]
    assert [(e.model_version, e.comparison_id, e.response) for e in events] == [
        (serving, cid, a["text"]), (canary, cid, b["text"])]
    assert [e.parameters.seed for e in events] == [5, 6]
    # feedback on the pair is accepted like any comparison's
    fb = httpx.post(gateway.url + "/v1/feedback", json={"type": "comparison", "winner": "a",
                                                         "completion_ids": [a["completion_id"], b["completion_id"]]},
                    timeout=30)
    assert fb.status_code == 202, fb.text

    # fewer versions than answers: answer i runs on model_versions[i % len]
    r = compare(gateway, prompt=prompt, n=3, max_tokens=4, model_versions=[canary, serving])
    assert r.status_code == 200, r.text
    assert [c["model_version"] for c in r.json()["completions"]] == [canary, serving, canary]
    r = compare(gateway, prompt=prompt, n=4, max_tokens=4, model_versions=[canary])  # the canary alone
    assert [c["model_version"] for c in r.json()["completions"]] == [canary] * 4


@pytest.mark.parametrize("versions, message", [
    (["not-loaded-v7"], "'not-loaded-v7' not loaded on this gateway; loaded: "),
    (["SERVING", "not-loaded-v7"], "'not-loaded-v7' not loaded"),
    (["SERVING", "CANARY", "SERVING"], "names 3 versions for 2 answers"),
])
def test_compare_refuses_versions_that_are_not_loaded(two_versions, versions, message):
    gateway, serving, canary = two_versions
    versions = [{"SERVING": serving, "CANARY": canary}.get(v, v) for v in versions]
    # the recorder publishes on its own thread: the earlier tests' completions must be in before counting
    assert gateway.services.recorder.flush()
    before = len(gateway.completion_events())
    r = compare(gateway, prompt="compare: not loaded", n=2, max_tokens=4, model_versions=versions)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]["message"]
    if "loaded: " in message:
        assert serving in r.json()["error"]["message"] and canary in r.json()["error"]["message"]
    engine = gateway.services.engine
    assert engine.stats()["queue_size"] == 0 and engine.stats()["batch_size"] == 0  # nothing was started
    assert gateway.services.recorder.flush() and len(gateway.completion_events()) == before


async def test_grpc_compare_names_versions(two_versions):
    gateway, serving, canary = two_versions
    async with grpc_channel(gateway.services) as channel:
        stub = feedback_service_pb2_grpc.FeedbackStub(channel)
        reply = await stub.Compare(feedback_service_pb2.CompareRequest(
            text="grpc compare versions:", n=2, model_versions=[canary, serving],
            parameters=common_pb2.SamplingParameters(max_new_tokens=4)))
        assert [c.model_version for c in reply.completions] == [canary, serving]
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Compare(feedback_service_pb2.CompareRequest(text="x", n=2, model_versions=["nope"]))
        assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'nope'" in unknown.value.details()
