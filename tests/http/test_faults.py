"""Cases that need a fault or a timing the real engine cannot be made to produce on demand: a full
queue (429), a client that leaves mid-stream, a failure mid-stream, and the app-managed lifecycle."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import text_generation
from text_generation.errors import GenerationError as TgiGenerationError
from text_generation.errors import OverloadedError

from serving.engine.types import StepOutput, Token
from serving.errors import GenerationError
from serving.http.openai_output import StopHoldback
from tests.fakes import FakeEngine
from tests.http.server import fake_services, serve_http

SLOW = {"inputs": "one two three", "parameters": {"max_new_tokens": 50}}  # 50 tokens x 0.2 s = 10 s


def wait_for(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def slow_server(tmp_path):
    """One slot, no queue, 0.2 s per token: a second request while one streams is refused."""
    engine = FakeEngine(capacity=1, max_queue=0, delay=0.2)
    with serve_http(fake_services(tmp_path, engine)) as url:
        yield url, engine


def test_full_queue_answers_429_in_each_format(slow_server):
    url, engine = slow_server
    with httpx.stream("POST", url + "/generate_stream", json=SLOW, timeout=30) as held:
        lines = held.iter_lines()  # kept: a dropped line iterator closes the connection
        next(lines)  # the slot is taken once the first token is out
        r = httpx.post(url + "/generate", json=SLOW)
        assert r.status_code == 429
        assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        r = httpx.post(url + "/generate_stream", json=SLOW)  # refused before any event: a JSON 429
        assert r.status_code == 429 and r.headers["content-type"] == "application/json"
        with pytest.raises(OverloadedError):
            text_generation.Client(url).generate("one two", max_new_tokens=2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model="m", prompt="one two", max_tokens=2)
        assert err.value.code == "model_overloaded" and err.value.body["type"] == "rate_limit_error"


@pytest.mark.parametrize("path, body", [
    ("/generate_stream", SLOW),
    ("/", {**SLOW, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a b"}], "max_tokens": 50, "stream": True}),
    ("/v1/completions", {"prompt": "a b", "max_tokens": 50, "stream": True}),
])
def test_disconnect_frees_the_slot_at_once(slow_server, path, body):
    url, engine = slow_server
    with httpx.stream("POST", url + path, json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)
        assert engine.running == 1
    # The client is gone with ~10 s of tokens left: the slot must be free long before that.
    assert wait_for(lambda: engine.running == 0, timeout=1.5)
    r = httpx.post(url + "/generate", json={"inputs": "again", "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 200
    metrics = httpx.get(url + "/metrics").text
    assert 'feedloop_requests_total{model_version="fake-v1",outcome="cancelled"} 1.0' in metrics


@pytest.mark.parametrize("path, body", [
    ("/generate", SLOW),
    ("/", SLOW),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a b"}], "max_tokens": 50}),
    ("/v1/completions", {"prompt": "a b", "max_tokens": 50}),
])
def test_client_timeout_on_a_whole_answer_frees_the_slot(slow_server, path, body):
    url, engine = slow_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + path, json=body, timeout=0.5)
    assert wait_for(lambda: engine.running == 0, timeout=1.5)


class FailingEngine(FakeEngine):
    """Streams two tokens, then fails as the engine does when a decode step breaks."""

    async def generate(self, prompt, params, request_id):
        for i in range(2):
            yield StepOutput(Token(i, f" t{i}", -0.1, False), f" t{i}")
        raise GenerationError("generation failed: CUDA error")


def test_failure_mid_stream_becomes_an_error_event(tmp_path):
    with serve_http(fake_services(tmp_path, FailingEngine())) as url:
        with httpx.stream("POST", url + "/generate_stream", json=SLOW) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        assert r.status_code == 200
        assert events[-1] == {"error": "generation failed: CUDA error", "error_type": "generation"}
        with pytest.raises(TgiGenerationError, match="CUDA error"):
            list(text_generation.Client(url).generate_stream("x y"))
        # non-streaming: nothing was sent yet, so the error gets its status (TGI: 424)
        r = httpx.post(url + "/generate", json=SLOW)
        assert r.status_code == 424 and r.json()["error_type"] == "generation"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="CUDA error"):
            list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                stream=True))
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="m", prompt="x")


class RecordingEngine(FakeEngine):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    async def start(self):
        self.calls.append("start")

    async def stop(self):
        self.calls.append("stop")


@pytest.mark.parametrize("manage", [False, True])
def test_app_starts_services_only_when_asked(tmp_path, manage):
    engine = RecordingEngine()
    with serve_http(fake_services(tmp_path, engine), manage_services=manage):
        assert engine.calls == (["start"] if manage else [])
    assert engine.calls == (["start", "stop"] if manage else [])


def test_stop_holdback_never_sends_a_stop_sequence():
    """Hand-made stream: "Hello wor" + "ld!" with stop "world": nothing of "wor" may leave early."""
    holdback = StopHoldback(("world",))

    def out(text, finish=None, full=None):
        return StepOutput(Token(0, text, 0.0, False), text, finish, full)

    assert holdback.push(out("Hello")) == "Hello"
    assert holdback.push(out(" wo")) == " "  # "wo" might start "world": held
    assert holdback.push(out("r")) == ""
    # The engine ends the text with the stop sequence; OpenAI's answer leaves it out.
    assert holdback.push(out("ld", "stop_sequence", "Hello world")) == ""
    other = StopHoldback(("world",))
    assert [other.push(out(t)) for t in ("Hello", " wo", "n")] == ["Hello", " ", "won"]
    assert other.push(out("!", "length", "Hello won!")) == "!"
