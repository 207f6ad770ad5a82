"""SGLang as an upstream that reloads in place.

Generation goes over SGLang's OpenAI-compatible routes (`OpenAIUpstream`). What makes it more than
an `openai` upstream is its native admin API, which lets the fleet hot-swap it like a feedloop
worker instead of blue/green:

- `POST /update_weights_from_disk {"model_path", "weight_version", "abort_all_requests": false}`:
  SGLang loads the checkpoint into the running server. With `abort_all_requests` false it lets the
  requests it is running finish first and holds new ones until the new weights are in (so the pool
  pauses the server: new requests go to the others meanwhile). 200 `{"success": true, "message",
  "num_paused_requests"}`; 400 `{"success": false, "message"}` when it could not load them — it
  then keeps serving the old weights, which is a refusal of the version (`RolloutRefused`, `load`).
- `GET /model_info` (older releases: `/get_model_info`): `model_path` and `weight_version`, which
  the health checks read, so a restarted SGLang pod (back on its `--model-path`) is seen as drifted
  and reloaded. SGLang's default `weight_version` is "default": that says nothing, and the version
  configured for the upstream stands.

SGLang does not check the files it loads: the gateway verifies the checkpoint against the
registry's checksums itself before the first SGLang reload of a version (serving/fleet.py), so it
must see the checkpoints volume. SGLang serves one model per server, so a canary cannot be split
inside it: it needs feedloop workers or a blue/green pool.
"""
from __future__ import annotations

import httpx

from serving.upstreams.base import RolloutFailed, RolloutRefused
from serving.upstreams.openai_upstream import OpenAIUpstream

RELOAD_PATH = "/update_weights_from_disk"
MODEL_INFO_PATHS = ("/model_info", "/get_model_info")  # newer releases first
UNSET_VERSION = "default"  # SGLang's weight_version when the server was not given one


class SGLangUpstream(OpenAIUpstream):
    kind = "sglang"

    async def describe(self, http: httpx.AsyncClient) -> dict | None:
        """What the server says it serves (for the health checks): {"model_version", "model_path"}."""
        for path in MODEL_INFO_PATHS:
            try:
                r = await http.get(f"{self.url}{path}")
            except httpx.HTTPError:
                return None
            if r.status_code == 404:
                continue
            if r.status_code != 200:
                return None
            try:
                body = r.json()
            except ValueError:
                return None
            version = body.get("weight_version")
            if not (isinstance(version, str) and version and version != UNSET_VERSION):
                version = self.model_version  # "default" says nothing: keep what we know
            return {"model_version": version, "model_path": body.get("model_path")}
        return None

    async def reload(self, http: httpx.AsyncClient, model_path: str, version: str, done: list[dict]) -> dict:
        """Load `model_path` as `version` in place; the answer in the shape of a feedloop worker's."""
        body = {"model_path": model_path, "weight_version": version, "abort_all_requests": False}
        try:
            r = await http.post(f"{self.url}{RELOAD_PATH}", json=body)
        except httpx.HTTPError as exc:
            raise RolloutFailed(self.url, f"{type(exc).__name__}: {exc}", done) from None
        try:
            answer = r.json()
        except ValueError:
            answer = {}
        message = str(answer.get("message") or r.text[:500])
        if r.status_code == 400 or (r.status_code == 200 and answer.get("success") is False):
            raise RolloutRefused(self.url, "load", f"SGLang could not load {model_path}: {message}", done)
        if r.status_code != 200:
            raise RolloutFailed(self.url, f"{r.status_code} {message}", done)
        previous = self.model_version
        self.reloaded_to(version)
        return {"role": "policy", "model_version": version, "previous": previous, "message": message,
                "num_paused_requests": answer.get("num_paused_requests")}


__all__ = ["SGLangUpstream"]
