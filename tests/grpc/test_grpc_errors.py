"""serving.errors and client mistakes → gRPC status codes, with clear details and no tracebacks."""
from __future__ import annotations

import grpc
import pytest

from tests.fakes import FakeEngine
from serving.engine.types import StepOutput, Token
from serving.errors import EngineUnavailable, GenerationError
from serving.settings import ServingSettings
from protos.feedloop.v1 import common_pb2, serving_pb2


async def generate_error(running, request) -> grpc.aio.AioRpcError:
    """Run a Generate call to its end; return the error it ended with."""
    call = running.stub.Generate(request)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value


def error_kind(error: grpc.aio.AioRpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get("x-error-kind")


@pytest.mark.parametrize("params, field", [
    ({"temperature": -1.0}, "temperature"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 1.5}, "top_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"stop": ["s"] * 9}, "stop"),
])
async def test_invalid_parameters_are_invalid_argument(serve, params, field):
    running = await serve()
    request = serving_pb2.GenerateRequest(text="hi", parameters=common_pb2.SamplingParameters(**params))
    error = await generate_error(running, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()
    assert error_kind(error) == "validation"


@pytest.mark.parametrize("request_", [
    serving_pb2.GenerateRequest(),
    serving_pb2.GenerateRequest(text=""),
    serving_pb2.GenerateRequest(chat=common_pb2.Conversation()),
    serving_pb2.GenerateRequest(chat={"messages": [{"content": "no role"}]}),
], ids=["no-prompt", "empty-text", "no-messages", "no-role"])
async def test_missing_prompt_is_invalid_argument(serve, request_):
    error = await generate_error(await serve(), request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_prompt_too_long_is_invalid_argument(serve):
    running = await serve(FakeEngine(max_input_tokens=8))
    error = await generate_error(running, serving_pb2.GenerateRequest(text="word " * 20))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "8 tokens" in error.details()


async def test_overload_is_resource_exhausted(serve):
    engine = FakeEngine(capacity=1, max_queue=0, delay=0.05)
    running = await serve(engine)
    first = running.stub.Generate(serving_pb2.GenerateRequest(text="hi", parameters={"max_new_tokens": 100}))
    await first.read()  # now it holds the only slot
    error = await generate_error(running, serving_pb2.GenerateRequest(text="hi"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "overloaded" in error.details().lower()
    assert error_kind(error) == "overloaded"
    first.cancel()


class FailingEngine(FakeEngine):
    """Fails in a chosen way: before the first token, or after it."""

    def __init__(self, error: BaseException, after_first: bool):
        super().__init__()
        self.error, self.after_first = error, after_first

    async def generate(self, prompt, params, request_id):
        if self.after_first:
            yield StepOutput(Token(1, "x", -0.1, False), "x")
        raise self.error


async def test_generation_error_mid_stream_is_internal(serve):
    running = await serve(FailingEngine(GenerationError("decode step failed: NaN logits"), after_first=True))
    call = running.stub.Generate(serving_pb2.GenerateRequest(text="hi"))
    first = await call.read()
    assert first.text == "x"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "decode step failed: NaN logits"
    assert error_kind(info.value) == "generation"


async def test_a_failure_on_a_version_names_it_in_the_trailing_metadata(serve):
    failed = GenerationError("prefill failed on canary-v2: index out of range")
    failed.model_version = "canary-v2"  # as LaneFailed and the upstream pool set it
    running = await serve(FailingEngine(failed, after_first=False))
    error = await generate_error(running, serving_pb2.GenerateRequest(text="hi"))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert dict(error.trailing_metadata())["x-model-version"] == "canary-v2"  # not the serving fake-v1


async def test_engine_unavailable_is_unavailable(serve):
    running = await serve(FailingEngine(EngineUnavailable("engine is stopping"), after_first=False))
    error = await generate_error(running, serving_pb2.GenerateRequest(text="hi"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "engine is stopping"


async def test_unexpected_errors_do_not_leak(serve):
    running = await serve(FailingEngine(RuntimeError("secret path /srv/weights"), after_first=False))
    error = await generate_error(running, serving_pb2.GenerateRequest(text="hi"))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "Traceback" not in error.details()
    assert error.details() == "internal error (see the server log)"


@pytest.mark.parametrize("pairs, message", [
    ([], "at least one"),
    ([{"text": "q", "response": "a"}] * 65, "at most 64"),
    ([{"response": "a"}], "pairs[0]"),
], ids=["empty", "too-many", "no-prompt"])
async def test_bad_score_requests_are_invalid_argument(serve, pairs, message):
    running = await serve()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await running.stub.Score(serving_pb2.ScoreRequest(pairs=pairs))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


async def test_messages_over_max_body_bytes_are_refused(serve):
    running = await serve(settings=ServingSettings(max_body_bytes=1024))
    error = await generate_error(running, serving_pb2.GenerateRequest(text="a" * 2000))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
