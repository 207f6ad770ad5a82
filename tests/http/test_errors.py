"""Error answers: each kind of client mistake gets the route family's format and status, never a 500;
unexpected server errors give a bare 500. FakeEngine: prompts up to 64 words, bodies up to 4096 bytes."""
from __future__ import annotations

import httpx
import pytest

from tests.fakes import FakeEngine
from tests.http.server import SMALL_BODY_LIMIT, fake_services, serve_http

TGI = {"path": "/generate", "ok": {"inputs": "hello there", "parameters": {"max_new_tokens": 2}}}
CHAT = {"path": "/v1/chat/completions", "ok": {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 2}}
COMPLETIONS = {"path": "/v1/completions", "ok": {"model": "m", "prompt": "hello", "max_tokens": 2}}


def tgi_error(r: httpx.Response, status: int, contains: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and contains in body["error"], body
    assert "Traceback" not in r.text
    assert r.headers["x-model-version"] == "fake-v1"


def openai_error(r: httpx.Response, status: int, contains: str, param: str | None = "?",
                 version: str = "fake-v1") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and contains in error["message"], error
    if param != "?":
        assert error["param"] == param, error
    assert r.headers["x-model-version"] == version
    return error


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/"])
@pytest.mark.parametrize("parameters, contains", [
    ({"max_new_tokens": 2, "colour": "red"}, "unknown field `parameters.colour`"),
    ({"temperature": -1.0}, "`temperature` must be strictly positive"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"max_new_tokens": 10**9}, "`max_new_tokens` must be <= 128"),
    ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
    ({"stop": ["a"] * 9}, "`stop` supports up to 8 stop sequences"),
    ({"seed": -1}, "`seed`"),
    ({"temperature": "hot"}, "`parameters.temperature`"),
    ({"grammar": {"type": "regex", "value": "a+"}}, "grammar is not supported"),
    ({"watermark": True}, "`watermark` is not supported"),
    ({"truncate": 10}, "`truncate` is not supported"),
    ({"decoder_input_details": True}, "`decoder_input_details` is not supported"),
])
def test_tgi_bad_parameters_are_422(fake_url, route, parameters, contains):
    r = httpx.post(fake_url + route, json={"inputs": "hello there", "parameters": parameters})
    tgi_error(r, 422, contains)
    assert r.json()["error_type"] == "validation"


def test_tgi_request_level_mistakes(fake_url):
    tgi_error(httpx.post(fake_url + "/generate", json={"inputs": "x", "colour": 1}), 422, "unknown field `colour`")
    tgi_error(httpx.post(fake_url + "/generate", json={"parameters": {}}), 422, "`inputs` is required")
    tgi_error(httpx.post(fake_url + "/generate", json={"inputs": ""}), 422, "`inputs` cannot be empty")
    tgi_error(httpx.post(fake_url + "/generate", json={"inputs": "word " * 65}), 422, "less than 64 tokens")
    tgi_error(httpx.post(fake_url + "/generate", content=b'{"inputs": "x",', headers={"content-type":
              "application/json"}), 422, "not valid JSON")
    tgi_error(httpx.post(fake_url + "/generate", content=b'{"inputs": "\xe7\xad"}', headers={"content-type":
              "application/json"}), 422, "not valid JSON")  # not UTF-8
    tgi_error(httpx.post(fake_url + "/generate", json=["not", "an", "object"]), 422, "must be a JSON object")
    tgi_error(httpx.post(fake_url + "/generate", content=b'{"inputs": "x"}', headers={"content-type":
              "text/plain"}), 422, "must be a JSON object")


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS], ids=["chat", "completions"])
@pytest.mark.parametrize("change, param, contains", [
    ({"colour": "red"}, "colour", "Unrecognized request argument supplied: colour"),
    ({"n": 3}, "n", "`n` must be 1"),
    ({"temperature": 2.5}, "temperature", "between 0 and 2"),
    ({"top_p": 0.0}, None, "`top_p`"),
    ({"max_tokens": 0}, "max_tokens", "`max_tokens` must be at least 1"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"logit_bias": {"50256": -100}}, "logit_bias", "not supported"),
    ({"stop": ["s"] * 9}, "stop", "up to 8"),
    ({"max_tokens": "many"}, "max_tokens", "`max_tokens`"),
])
def test_openai_bad_parameters_are_400(fake_url, route, change, param, contains):
    r = httpx.post(fake_url + route["path"], json={**route["ok"], **change})
    error = openai_error(r, 400, contains, param)
    assert error["type"] == "invalid_request_error"


def test_openai_request_level_mistakes(fake_url):
    json_ct = {"content-type": "application/json"}
    error = openai_error(httpx.post(fake_url + "/v1/chat/completions", content=b"{oops", headers=json_ct),
                         400, "not valid JSON", None)
    assert error["code"] == "invalid_json"
    # /v1/score is feedloop's own route: OpenAI's body, but the engine's 422
    assert openai_error(httpx.post(fake_url + "/v1/score", content=b"{oops", headers=json_ct), 422,
                        "not valid JSON", None, version="fake-rm-v1")["code"] == "invalid_json"
    openai_error(httpx.post(fake_url + "/v1/chat/completions", json={"model": "m", "messages": []}), 400,
                 "at least 1 item", "messages")
    openai_error(httpx.post(fake_url + "/v1/chat/completions", json={"messages": [{"role": "robot",
                 "content": "x"}]}), 400, "`messages[0].role`")
    error = openai_error(httpx.post(fake_url + "/v1/completions", json={"prompt": "word " * 65}), 400,
                         "less than 64 tokens")
    assert error["code"] == "context_length_exceeded"
    openai_error(httpx.post(fake_url + "/v1/completions", json={"prompt": ["a", "b"]}), 400, "one prompt",
                 "prompt")
    openai_error(httpx.post(fake_url + "/v1/completions", json={"prompt": [1, 2, 3]}), 400, "token-id", "prompt")
    openai_error(httpx.post(fake_url + "/v1/chat/completions", json={**CHAT["ok"], "tools": [{"type":
                 "function", "function": {"name": "f"}}]}), 400, "tools are not supported", "tools")


def test_unknown_routes_and_wrong_methods(fake_url):
    tgi_error(httpx.get(fake_url + "/nowhere"), 404, "no route GET /nowhere")
    error = openai_error(httpx.post(fake_url + "/v1/engines", json={}), 404, "Invalid URL (POST /v1/engines)")
    assert error["code"] == "not_found"
    r = httpx.get(fake_url + "/generate")
    tgi_error(r, 405, "method GET is not allowed")
    assert r.headers["allow"] == "POST"
    openai_error(httpx.put(fake_url + "/v1/chat/completions", json={}), 405, "method PUT is not allowed")
    openai_error(httpx.delete(fake_url + "/v1/models"), 405, "not allowed")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_too_large_is_413_in_the_routes_format(fake_url, chunked):
    big = b'{"inputs": "' + b"x" * (SMALL_BODY_LIMIT + 10) + b'"}'
    content = iter([big[:1000], big[1000:]]) if chunked else big  # an iterator makes httpx send it chunked
    r = httpx.post(fake_url + "/generate", content=content, headers={"content-type": "application/json"})
    tgi_error(r, 413, f"at most {SMALL_BODY_LIMIT} bytes")
    content = iter([big[:1000], big[1000:]]) if chunked else big
    r = httpx.post(fake_url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert openai_error(r, 413, f"at most {SMALL_BODY_LIMIT} bytes")["code"] == "request_too_large"
    # a body just under the limit still gets through
    ok = httpx.post(fake_url + "/generate", json={"inputs": "x" * 3900, "parameters": {"max_new_tokens": 1}})
    assert ok.status_code == 200


def test_every_answer_has_a_model_version(fake_url):
    for method, path in [("GET", "/info"), ("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                         ("GET", "/openapi.json"), ("GET", "/nowhere")]:
        r = httpx.request(method, fake_url + path)
        assert r.headers["x-model-version"] == "fake-v1", path
    r = httpx.post(fake_url + "/v1/score", json={"inputs": [{"prompt": "a", "response": "b c"}]})
    assert r.json()["scores"] == [2.0] and r.headers["x-model-version"] == "fake-rm-v1"


def test_metrics_count_requests(fake_url):
    httpx.post(fake_url + "/generate", json=TGI["ok"])
    r = httpx.get(fake_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'feedloop_requests_total{model_version="fake-v1",outcome="ok"}' in r.text


class BrokenEngine(FakeEngine):
    """Fails with a bug (not a FeedloopError) before its first output."""

    async def generate(self, prompt, params, request_id):
        raise RuntimeError("secret internal detail")
        yield  # pragma: no cover - makes this an async generator


def test_unexpected_errors_are_a_bare_500(tmp_path, caplog):
    with serve_http(fake_services(tmp_path, BrokenEngine())) as url:
        r = httpx.post(url + "/generate", json=TGI["ok"])
        assert r.status_code == 500 and r.json() == {"error": "internal server error", "error_type": "internal"}
        r = httpx.post(url + "/v1/completions", json=COMPLETIONS["ok"])
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "secret" not in r.text
    assert "secret internal detail" in caplog.text  # logged, with its trace, for the operator
