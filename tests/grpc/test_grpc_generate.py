"""Generate and Score through real grpcio stubs (asyncio and sync), on the real engine (tiny model)."""
from __future__ import annotations

import asyncio
import math
import struct

import grpc

from serving.engine.types import SamplingParams
from tests.fakes import FakeEngine
from protos.feedloop.v1 import common_pb2, serving_pb2, serving_pb2_grpc

PROMPT = "The capital of France is"
ENDINGS = (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_EOS_TOKEN)


def text_request(text: str = PROMPT, **params) -> serving_pb2.GenerateRequest:
    return serving_pb2.GenerateRequest(text=text, parameters=common_pb2.SamplingParameters(**params))


def as_float32(x: float) -> float:
    """What a proto `float` field gives back for `x`."""
    return struct.unpack("f", struct.pack("f", x))[0]


async def collect(call) -> list[serving_pb2.GenerateResponse]:
    return [msg async for msg in call]


async def test_generate_streams_tokens_then_a_final_message(serve, tiny_services):
    running = await serve(services=tiny_services)
    engine = tiny_services.engine
    call = running.stub.Generate(text_request(max_new_tokens=12))
    messages = await collect(call)

    *middle, last = messages
    assert all(m.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for m in middle)
    assert not any(m.HasField("generated_text") or m.HasField("prompt_tokens") for m in middle)
    assert last.finish_reason in ENDINGS
    assert last.generated_tokens == len(messages) <= 12
    assert last.generated_text == "".join(m.text for m in messages)
    assert last.prompt_tokens == engine.count_tokens(PROMPT)
    assert not last.HasField("seed")  # greedy, none asked

    ids = {m.completion_id for m in messages}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    assert {m.model_version for m in messages} == {engine.model_version}
    headers = dict(await call.initial_metadata())
    assert headers["x-completion-id"] == messages[0].completion_id
    assert headers["x-model-version"] == engine.model_version
    assert await call.code() == grpc.StatusCode.OK


async def test_grpc_gives_what_the_service_gives(serve, tiny_services):
    """Same service objects as HTTP: greedy tokens over gRPC equal a direct service call's."""
    running = await serve(services=tiny_services)
    messages = await collect(running.stub.Generate(text_request(max_new_tokens=10)))
    direct = await tiny_services.generation.complete(PROMPT, SamplingParams(max_new_tokens=10))
    assert [m.token.id for m in messages] == [t.id for t in direct.tokens]
    assert messages[-1].generated_text == direct.text
    assert [m.token.logprob for m in messages] == [as_float32(t.logprob) for t in direct.tokens]


async def test_completion_ids_are_unique(serve, tiny_services):
    running = await serve(services=tiny_services)
    streams = await asyncio.gather(*(collect(running.stub.Generate(text_request(max_new_tokens=2)))
                                     for _ in range(5)))
    assert len({s[0].completion_id for s in streams}) == 5


async def test_seeded_sampling_is_reproducible_and_the_seed_comes_back(serve, tiny_services):
    running = await serve(services=tiny_services)
    request = text_request(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, seed=2**64 - 1)
    first, second = [await collect(running.stub.Generate(request)) for _ in range(2)]
    assert [m.token.id for m in first] == [m.token.id for m in second]
    assert first[-1].seed == 2**64 - 1


async def test_stop_sequence(serve, tiny_services):
    running = await serve(services=tiny_services)
    greedy = await collect(running.stub.Generate(text_request(max_new_tokens=12)))
    # Stop at a piece of text greedy decoding is known to produce (decoding is deterministic).
    stop = next(m.text for m in greedy if m.text.strip())
    last = (await collect(running.stub.Generate(text_request(max_new_tokens=12, stop=[stop]))))[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP_SEQUENCE
    assert last.generated_tokens <= greedy[-1].generated_tokens


async def test_chat_messages_go_through_the_chat_template(serve, tiny_services):
    running = await serve(services=tiny_services)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    request = serving_pb2.GenerateRequest(chat={"messages": messages}, parameters={"max_new_tokens": 4})
    last = (await collect(running.stub.Generate(request)))[-1]
    rendered = tiny_services.engine.render_chat(messages)
    assert last.prompt_tokens == tiny_services.engine.count_tokens(rendered)
    assert last.finish_reason in ENDINGS


async def test_max_new_tokens_defaults_to_the_setting(serve):
    # FakeEngine: it never stops early, so the count is exact.
    running = await serve(FakeEngine())
    messages = await collect(running.stub.Generate(serving_pb2.GenerateRequest(text="hi")))
    assert messages[-1].generated_tokens == running.services.settings.max_new_tokens_default


async def test_sync_stub_in_a_thread(serve, tiny_services):
    running = await serve(services=tiny_services)

    def call_with_sync_stub():
        with grpc.insecure_channel(running.target) as channel:
            stub = serving_pb2_grpc.ServingStub(channel)
            messages = list(stub.Generate(text_request(max_new_tokens=3), timeout=30))
            scored = stub.Score(serving_pb2.ScoreRequest(pairs=[{"text": "q", "response": "a b"}]), timeout=30)
            return messages, scored

    # The server runs on this event loop, so the blocking client must run elsewhere.
    messages, scored = await asyncio.to_thread(call_with_sync_stub)
    assert messages[-1].generated_text == "".join(m.text for m in messages)
    assert len(scored.scores) == 1


async def test_score_text_and_chat_pairs(serve, tiny_services):
    running = await serve(services=tiny_services)
    chat = [{"role": "user", "content": "Say hi."}]
    response = await running.stub.Score(serving_pb2.ScoreRequest(pairs=[
        serving_pb2.ScorePair(text="What is 2+2?", response="4"),
        serving_pb2.ScorePair(chat={"messages": chat}, response="Hi there."),
    ]))
    direct = await tiny_services.scoring.score([("What is 2+2?", "4"), (chat, "Hi there.")])
    assert list(response.scores) == direct.scores and all(map(math.isfinite, response.scores))
    assert response.model_version == tiny_services.reward.model_version
    assert response.trained is tiny_services.reward.trained
