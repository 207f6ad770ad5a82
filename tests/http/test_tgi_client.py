"""The TGI-compatible routes through the real `text_generation` client (unchanged), on the real engine
with the tiny model. Greedy answers are deterministic, so stream and non-stream must agree."""
from __future__ import annotations

import httpx
import pytest
from text_generation import AsyncClient, Client
from text_generation.errors import ValidationError

PROMPT = "The quick brown fox jumps over the lazy dog. Then the dog"


@pytest.fixture(scope="module")
def client(policy_url) -> Client:
    return Client(policy_url, timeout=60)


@pytest.fixture(scope="module")
def greedy(client):
    """The greedy answer to PROMPT (12 new tokens), the reference the other tests compare with."""
    return client.generate(PROMPT, max_new_tokens=12)


def test_generate_returns_details_with_logprobs(greedy, policy_services):
    d = greedy.details
    assert d.finish_reason in ("length", "eos_token")
    assert d.generated_tokens == len(d.tokens) <= 12
    assert d.prefill == [] and d.seed is None  # greedy: no seed
    assert all(t.logprob is not None and t.logprob <= 0.0 for t in d.tokens)
    assert greedy.generated_text == "".join(t.text for t in d.tokens if not t.special)


def test_stream_matches_generate(client, greedy):
    events = list(client.generate_stream(PROMPT, max_new_tokens=12))
    assert [e.token.id for e in events] == [t.id for t in greedy.details.tokens]
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == greedy.generated_text
    assert last.details.finish_reason == greedy.details.finish_reason
    assert last.details.generated_tokens == len(events)


async def test_async_client_generate_and_stream(policy_url, greedy):
    client = AsyncClient(policy_url, timeout=60)
    answer = await client.generate(PROMPT, max_new_tokens=12)
    assert answer.generated_text == greedy.generated_text
    events = [e async for e in client.generate_stream(PROMPT, max_new_tokens=12)]
    assert events[-1].generated_text == greedy.generated_text
    assert [e.token.text for e in events] == [t.text for t in greedy.details.tokens]


def test_stop_sequence_is_kept_in_the_text(client, greedy):
    """TGI keeps the matched stop sequence at the end of generated_text."""
    text = greedy.generated_text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3, "the tiny model's answer is too short for this test"
    answer = client.generate(PROMPT, max_new_tokens=12, stop_sequences=[stop])
    assert answer.details.finish_reason == "stop_sequence"
    assert answer.generated_text == text[: text.find(stop) + len(stop)]
    streamed = list(client.generate_stream(PROMPT, max_new_tokens=12, stop_sequences=[stop]))
    assert streamed[-1].generated_text == answer.generated_text
    assert streamed[-1].details.finish_reason == "stop_sequence"


def test_return_full_text_prepends_the_prompt(client, greedy):
    answer = client.generate(PROMPT, max_new_tokens=12, return_full_text=True)
    assert answer.generated_text == PROMPT + greedy.generated_text


def test_seeded_sampling_is_reproducible(client):
    a = client.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=1234, temperature=0.9)
    b = client.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=1234, temperature=0.9)
    assert a.generated_text == b.generated_text
    assert a.details.seed == 1234


def test_compat_route_answers_a_list_and_streams(policy_url, greedy):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12}}
    r = httpx.post(policy_url + "/", json=body, timeout=60)
    assert r.status_code == 200
    assert r.json() == [{"generated_text": greedy.generated_text}]  # no details unless asked
    with httpx.stream("POST", policy_url + "/", json={**body, "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == len(greedy.details.tokens)


def test_completion_ids_are_unique_and_in_headers(policy_url, policy_services):
    ids = set()
    for path in ("/generate", "/", "/generate_stream"):
        for _ in range(2):
            r = httpx.post(policy_url + path, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}},
                           timeout=60)
            assert r.status_code == 200
            assert r.headers["x-model-version"] == policy_services.engine.model_version
            ids.add(r.headers["x-completion-id"])
    assert len(ids) == 6 and all(i.startswith("cmpl-") for i in ids)


def test_info_reports_limits_and_versions(policy_url, policy_services):
    r = httpx.get(policy_url + "/info")
    info = r.json()
    engine = policy_services.engine.info()
    assert info["model_version"] == engine.model_version == r.headers["x-model-version"]
    assert info["max_input_tokens"] == engine.max_input_tokens
    assert info["max_total_tokens"] == engine.max_total_tokens
    assert info["reward_model_version"] == policy_services.reward.model_version
    assert info["reward_model_trained"] is False
    for field in ("model_id", "model_sha", "model_dtype", "model_device_type", "max_concurrent_requests",
                  "max_best_of", "max_stop_sequences", "max_input_length", "validation_workers", "version",
                  "sha", "docker_label", "router"):
        assert field in info


def test_client_errors_arrive_as_validation_errors(client, policy_services):
    with pytest.raises(ValidationError, match="best_of"):
        client.generate(PROMPT, best_of=2, do_sample=True)
    with pytest.raises(ValidationError, match="top_n_tokens"):
        client.generate(PROMPT, top_n_tokens=3)
    too_long = "word " * (policy_services.engine.info().max_input_tokens + 10)
    with pytest.raises(ValidationError, match="must have less than"):
        client.generate(too_long, max_new_tokens=2)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        client.generate(PROMPT, max_new_tokens=policy_services.engine.info().max_total_tokens)
