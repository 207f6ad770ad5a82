"""An SGLang-compatible server for the tests (SGLang needs a GPU and cannot run here): the routes the
gateway uses, with SGLang's semantics —

- `POST /v1/completions` (stream, usage chunk, `[DONE]`; `GET /v1/models`), each token the name
  of the checkpoint directory it "loaded", so answers show which weights produced them;
- `POST /update_weights_from_disk {"model_path", "weight_version", "abort_all_requests"}`: holds new
  requests, waits for the running ones (`abort_all_requests` false), "loads" the directory (reads its
  `config.json`: missing or not JSON → 400 `{"success": false, "message"}`, old weights kept), then
  200 `{"success": true, "message", "num_paused_requests"}`;
- `GET /model_info` (`legacy=True`: only `/get_model_info`, as older releases) and `GET /health`.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse


class SGLangState:
    def __init__(self, model_path: str, weight_version: str = "default", delay: float = 0.01) -> None:
        self.model_path, self.weight_version, self.delay = model_path, weight_version, delay
        self.running = 0
        self.updates: list[dict] = []  # every /update_weights_from_disk body
        self._ready = asyncio.Event()
        self._ready.set()

    @property
    def token(self) -> str:
        return Path(self.model_path).name


def sglang_server(state: SGLangState, legacy: bool = False) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    async def info() -> dict:
        return {"model_path": state.model_path, "tokenizer_path": state.model_path, "is_generation": True,
                "weight_version": state.weight_version}

    app.get("/get_model_info" if legacy else "/model_info")(info)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "smollm2", "object": "model", "created": 0, "owned_by": "sglang"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        n = int(body.get("max_tokens") or 4)
        await state._ready.wait()  # SGLang holds new requests while it swaps weights
        state.running += 1
        token = state.token

        async def events():
            try:
                base = {"id": "cmpl-1", "object": "text_completion", "created": int(time.time()), "model": "smollm2"}
                for i in range(n):
                    await asyncio.sleep(state.delay)
                    choice = {"index": 0, "text": f"{token} ", "logprobs": None,
                              "finish_reason": "length" if i == n - 1 else None}
                    yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
                usage = {"prompt_tokens": 2, "completion_tokens": n, "total_tokens": n + 2}
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state.running -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/update_weights_from_disk")
    async def update(request: Request) -> JSONResponse:
        body = await request.json()
        state.updates.append(body)
        state._ready.clear()
        paused = state.running
        try:
            while state.running and not body.get("abort_all_requests"):
                await asyncio.sleep(0.01)  # the running requests finish on the old weights
            try:
                json.loads((Path(body["model_path"]) / "config.json").read_text())
            except (OSError, ValueError) as exc:
                return JSONResponse({"success": False, "message": f"Failed to load weights: {exc}",
                                     "num_paused_requests": paused}, status_code=400)
            await asyncio.sleep(0.1)  # loading
            state.model_path = body["model_path"]
            if body.get("weight_version"):
                state.weight_version = body["weight_version"]
            return JSONResponse({"success": True, "message": "Succeeded to update model weights.",
                                 "num_paused_requests": paused})
        finally:
            state._ready.set()

    return app
