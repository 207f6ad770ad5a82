"""Every served completion — TGI, OpenAI, streamed or whole, gRPC — is published once as a
CompletionServed event with what the request and the engine said. Real clients, real engine."""
from __future__ import annotations

import httpx
from openai import OpenAI
from text_generation import Client

from feedback.prompt_key import prompt_key
from protos.feedloop.v1 import common_pb2, serving_pb2, serving_pb2_grpc
from serving.engine.types import SamplingParams
from tests.feedback.gateway.conftest import grpc_channel

ENDINGS = (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_EOS_TOKEN)


def test_tgi_whole_and_streamed_answers_are_recorded(gateway):
    client = Client(gateway.url, timeout=60, headers={"X-Feedloop-User": "ann", "X-Feedloop-Tenant": "acme"})
    whole = client.generate("tgi whole: the sky is", max_new_tokens=6, do_sample=True, seed=7, top_k=20)
    streamed = list(client.generate_stream("tgi stream: the sea is", max_new_tokens=5))
    (e,) = gateway.served_where(text="tgi whole: the sky is")
    assert e.response == whole.generated_text and e.completion_tokens == whole.details.generated_tokens
    assert e.prompt_key == prompt_key("tgi whole: the sky is")
    assert e.model_version == gateway.services.engine.model_version
    assert e.meta.user == "ann" and e.meta.tenant == "acme" and e.meta.schema_version == 1 and e.meta.event_id
    assert e.parameters.do_sample and e.parameters.seed == 7 and e.parameters.top_k == 20
    assert e.parameters.max_new_tokens == 6 and e.finish_reason in ENDINGS and e.prompt_tokens > 0
    assert e.completion_id.startswith("cmpl-") and not e.comparison_id

    (s,) = gateway.served_where(text="tgi stream: the sea is")
    assert s.response == streamed[-1].generated_text and s.completion_tokens == len(streamed)
    assert not s.parameters.do_sample and not s.parameters.HasField("seed")  # greedy, sent no seed


def test_openai_chat_whole_and_streamed_are_recorded_with_messages_and_user(gateway):
    client = OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "openai chat?"}]}]
    raw = client.chat.completions.with_raw_response.create(model="m", messages=messages, max_tokens=5,
                                                            temperature=0, user="bob")
    answer = raw.parse()
    (e,) = gateway.served(answer.id)
    flat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "openai chat?"}]
    assert [{"role": m.role, "content": m.content} for m in e.chat.messages] == flat
    assert e.WhichOneof("prompt") == "chat" and e.prompt_key == prompt_key(flat)
    assert e.response == answer.choices[0].message.content and e.meta.user == "bob"
    assert e.completion_tokens == answer.usage.completion_tokens and e.prompt_tokens == answer.usage.prompt_tokens

    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=5, temperature=0,
                                                 stream=True))
    (s,) = gateway.served(chunks[0].id)
    assert s.response == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert s.prompt_key == e.prompt_key  # same conversation, same key

    text = client.completions.create(model="m", prompt="openai text:", max_tokens=4, temperature=0)
    (t,) = gateway.served(text.id)
    assert t.text == "openai text:" and t.response == text.choices[0].text


async def test_grpc_generate_is_recorded_with_metadata_user(gateway):
    async with grpc_channel(gateway.services) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        request = serving_pb2.GenerateRequest(
            chat=common_pb2.Conversation(messages=[common_pb2.ChatMessage(role="user", content="grpc hi")]),
            parameters=common_pb2.SamplingParameters(max_new_tokens=4))
        messages = [m async for m in stub.Generate(request, metadata=(("x-feedloop-user", "cy"),))]
    (e,) = gateway.served(messages[-1].completion_id)
    assert e.prompt_key == prompt_key([{"role": "user", "content": "grpc hi"}])
    assert e.response == messages[-1].generated_text and e.meta.user == "cy"
    assert e.finish_reason == messages[-1].finish_reason


async def test_cancelled_answers_are_not_recorded(gateway):
    generation = gateway.services.generation
    stream = await generation.stream("cancel me", SamplingParams(max_new_tokens=50, ignore_eos=True))
    async for _ in stream:
        break
    await stream.aclose()
    done = await generation.complete("after the cancel", SamplingParams(max_new_tokens=2))
    assert len(gateway.served(done.completion_id)) == 1  # the recorder has caught up past the cancel
    assert gateway.served(stream.completion_id, timeout=0) == []
    assert gateway.services.completions.get(stream.completion_id) is None


def test_metrics_count_published_events(gateway):
    text = httpx.get(gateway.url + "/metrics").text
    assert 'feedloop_events_published_total{topic="feedloop.completions"}' in text
    assert "feedloop_event_queue_depth" in text
