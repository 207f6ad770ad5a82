"""The OpenAI-compatible routes through the real `openai` client (unchanged), on the real engine with
the tiny model. temperature=0 is greedy, so streamed and whole answers must agree."""
from __future__ import annotations

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from serving.http.dependencies import served_model_name

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Name three colours."}]}]
PROMPT = "Once upon a time, in a land far away, there lived"


@pytest.fixture(scope="module")
def client(policy_url) -> OpenAI:
    return OpenAI(base_url=policy_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(policy_services) -> str:
    return served_model_name(policy_services)


@pytest.fixture(scope="module")
def chat_answer(client, model):
    return client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=10,
                                                             temperature=0, logprobs=True)


def test_chat_answer_carries_id_version_and_usage(chat_answer, model, policy_services):
    answer = chat_answer.parse()
    assert answer.id.startswith("cmpl-") and answer.id == chat_answer.headers["x-completion-id"]
    assert answer.system_fingerprint == policy_services.engine.model_version
    assert chat_answer.headers["x-model-version"] == answer.system_fingerprint
    assert answer.model == model and answer.object == "chat.completion"
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens == len(choice.logprobs.content) <= 10
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert all(t.logprob <= 0 for t in choice.logprobs.content)


def test_chat_stream_matches_whole_answer(client, model, chat_answer):
    whole = chat_answer.parse()
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id != whole.id  # a new completion
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.system_fingerprint == whole.system_fingerprint for c in chunks)


def test_completions_stream_and_whole_agree(client, model):
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0)
    choice = whole.choices[0]
    assert whole.object == "text_completion" and whole.usage.completion_tokens == len(choice.logprobs.tokens)
    assert "".join(choice.logprobs.tokens).startswith(choice.text) or choice.finish_reason == "stop"
    streamed = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    echoed = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + choice.text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_is_left_out(client, model, stream):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3, "the tiny model's answer is too short for this test"
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.completions.create(**kwargs).choices[0]
        text, finish = choice.text, choice.finish_reason
    assert text == full[: full.find(stop)]
    assert finish == "stop"


async def test_async_client_chat_and_completions(policy_url, model, chat_answer):
    client = AsyncOpenAI(base_url=policy_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    whole = await client.chat.completions.create(model="any-name", messages=MESSAGES, max_tokens=10, temperature=0)
    assert whole.choices[0].message.content == chat_answer.parse().choices[0].message.content
    assert whole.model == model  # any requested name is answered by the served model
    stream = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0,
                                                  stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == whole.choices[0].message.content
    completion = await client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0)
    stream = await client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, stream=True)
    assert "".join([c.choices[0].text async for c in stream]) == completion.choices[0].text
    await client.close()


def test_seeded_sampling_is_reproducible(client, model):
    answers = {client.completions.create(model=model, prompt=PROMPT, max_tokens=8, seed=7).choices[0].text
               for _ in range(2)}
    assert len(answers) == 1


def test_models(client, model, policy_services):
    listed = client.models.list()
    assert [m.id for m in listed.data] == [model]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


def test_bad_requests_are_400_in_openai_format(client, model, policy_services):
    cases = [
        (dict(n=2), "n", "`n` must be 1"),
        (dict(temperature=3.0), "temperature", "between 0 and 2"),
        (dict(top_logprobs=3, logprobs=True), "top_logprobs", "not supported"),
        (dict(extra_body={"foo": 1}), "foo", "Unrecognized request argument supplied: foo"),
        (dict(stream_options={"include_usage": True}), "stream_options", "only allowed when `stream`"),
    ]
    for kwargs, param, message in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, **kwargs)
        assert err.value.status_code == 400 and err.value.param == param, kwargs
        assert message in err.value.message
        assert err.value.body["type"] == "invalid_request_error"
    too_long = "word " * (policy_services.engine.info().max_input_tokens + 10)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=too_long, max_tokens=2)
    assert err.value.code == "context_length_exceeded"
