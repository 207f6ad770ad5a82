"""`POST /v1/score` on the real (tiny, untrained) reward model."""
from __future__ import annotations

import httpx


def test_scores_pairs_in_order(policy_url, policy_services):
    pairs = [{"prompt": "What is 2+2?", "response": "4"},
             {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}],
              "response": "Four, I believe."},
             {"prompt": "What is 2+2?", "response": "4"}]
    r = httpx.post(policy_url + "/v1/score", json={"inputs": pairs}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    version = policy_services.reward.model_version
    assert body["model_version"] == version == r.headers["x-model-version"]
    assert body["reward_model_trained"] is False
    assert len(body["scores"]) == 3 and all(isinstance(s, float) for s in body["scores"])
    assert abs(body["scores"][0] - body["scores"][2]) < 1e-4  # same pair, same score, whatever the batch


def test_bad_pairs_are_422_in_openai_format(policy_url, policy_services):
    limit = policy_services.settings.max_score_batch
    cases = [
        ({"inputs": []}, "at least one"),
        ({"inputs": [{"response": "x"}]}, "exactly one of `prompt` or `messages`"),
        ({"inputs": [{"prompt": "a", "messages": [{"role": "user", "content": "b"}], "response": "x"}]},
         "exactly one of"),
        ({"inputs": [{"prompt": "a"}]}, "`inputs[0].response` is required"),
        ({"inputs": [{"prompt": "a", "response": "b", "extra": 1}]}, "Unrecognized request argument"),
        ({"inputs": [{"prompt": "a", "response": "b"}] * (limit + 1)}, f"at most {limit}"),
        ({"inputs": [{"messages": [{"role": "user", "content": [{"type": "image_url"}]}], "response": "b"}]},
         "only text content parts"),
    ]
    for body, message in cases:
        r = httpx.post(policy_url + "/v1/score", json=body, timeout=60)
        assert r.status_code == 422, (body, r.text)
        error = r.json()["error"]
        assert message in error["message"], (body, error)
        assert error["type"] == "invalid_request_error"
        assert r.headers["x-model-version"] == policy_services.reward.model_version
