"""OpenAI answer bodies and stream chunks, built from the generation service's outputs.

`id` is the completion id (feedback refers to it), `system_fingerprint` the model version of the
weights that produced the answer, `model` the served model's name.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator
from typing import Literal

import anyio

from serving.engine.types import StepOutput, Token
from serving.errors import FeedloopError
from serving.http.errors import sse_error_body
from serving.http.sse import sse_data
from serving.services.generation import Completion, CompletionStream

log = logging.getLogger(__name__)

FINISH_REASON = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
_DONE = b"data: [DONE]\n\n"


def trim_stop(text: str, stops: tuple[str, ...]) -> str:
    """Cut the text where the first stop sequence begins (OpenAI leaves it out; TGI and the engine keep it)."""
    cut = min((i for i in (text.find(s) for s in stops) if i != -1), default=len(text))
    return text[:cut]


class StopHoldback:
    """Streams text without the stop sequence. The engine knows that a stop sequence matched only when
    its last character arrives, so text that could be the start of one is held back until later
    tokens decide; on the last output the text is trimmed and the rest sent."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0

    def push(self, out: StepOutput) -> str:
        """The text that can be sent now (possibly '')."""
        if out.finish_reason is None:
            self.text += out.text
            end = len(self.text) - self._partial_stop_len()
        else:
            self.text = out.generated_text if out.generated_text is not None else self.text + out.text
            if out.finish_reason == "stop_sequence":
                self.text = trim_stop(self.text, self.stops)
            end = len(self.text)
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop sequence."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprob(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf; vLLM uses the same stand-in


def chat_logprobs(tokens: list[Token]) -> dict:
    return {"content": [{"token": t.text, "logprob": _logprob(t.logprob), "bytes": list(t.text.encode()),
                         "top_logprobs": []} for t in tokens]}


def text_logprobs(tokens: list[Token], offset: int) -> dict:
    """Legacy completions format; `offset` is where the first token starts in the returned text."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [_logprob(t.logprob) for t in tokens],
            "top_logprobs": None, "text_offset": offsets}


def _answer_text(c: Completion, stops: tuple[str, ...]) -> str:
    return trim_stop(c.text, stops) if c.finish_reason == "stop_sequence" else c.text


def _header(completion_id: str, model_version: str, model: str, obj: str) -> dict:
    return {"id": completion_id, "object": obj, "created": int(time.time()), "model": model,
            "system_fingerprint": model_version}


def chat_completion(c: Completion, *, model: str, stops: tuple[str, ...], logprobs: bool) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": _answer_text(c, stops)},
              "logprobs": chat_logprobs(c.tokens) if logprobs else None,
              "finish_reason": FINISH_REASON[c.finish_reason]}
    return {**_header(c.completion_id, c.model_version, model, "chat.completion"), "choices": [choice],
            "usage": usage(c.prompt_tokens, len(c.tokens))}


def text_completion(c: Completion, *, model: str, stops: tuple[str, ...], logprobs: bool, echo: str) -> dict:
    choice = {"index": 0, "text": echo + _answer_text(c, stops),
              "logprobs": text_logprobs(c.tokens, len(echo)) if logprobs else None,
              "finish_reason": FINISH_REASON[c.finish_reason]}
    return {**_header(c.completion_id, c.model_version, model, "text_completion"), "choices": [choice],
            "usage": usage(c.prompt_tokens, len(c.tokens))}


async def stream_chunks(stream: CompletionStream, *, kind: Literal["chat", "text"], path: str, model: str,
                        stops: tuple[str, ...], logprobs: bool, include_usage: bool,
                        echo: str = "") -> AsyncGenerator[bytes, None]:
    """`data: {chunk}` events, then `data: [DONE]`. Chat chunks follow OpenAI: the first delta carries
    the role, the last one the finish_reason; with include_usage every chunk has `usage: null` and
    one more chunk with no choices carries the counts. A failure after the first byte is sent as an
    error event (the openai client raises it), then [DONE]."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    head = _header(stream.completion_id, stream.model_version, model, obj)
    offset = len(echo)

    def chunk(piece: str, finish: str | None, tokens: list[Token], first: bool = False) -> bytes:
        nonlocal offset
        if kind == "chat":
            delta = {"role": "assistant", "content": piece} if first else ({"content": piece} if piece else {})
            choice = {"index": 0, "delta": delta,
                      "logprobs": chat_logprobs(tokens) if logprobs and tokens else None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece, "logprobs": text_logprobs(tokens, offset) if logprobs else None,
                      "finish_reason": finish}
            offset += sum(len(t.text) for t in tokens)
        body = {**head, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return sse_data(body, space=True)

    holdback = StopHoldback(stops)
    pending: list[Token] = []
    last: StepOutput | None = None
    try:
        if kind == "chat":
            yield chunk("", None, [], first=True)
        elif echo:
            yield chunk(echo, None, [])
        async for out in stream:
            pending.append(out.token)
            piece = holdback.push(out)
            if piece or out.finish_reason is not None:
                yield chunk(piece, FINISH_REASON.get(out.finish_reason or ""), pending)
                pending = []
            last = out
        if include_usage and last is not None:
            yield sse_data({**head, "choices": [], "usage": usage(last.prompt_tokens, last.generated_tokens)},
                           space=True)
    except Exception as exc:
        if not isinstance(exc, FeedloopError):
            log.exception("generation stream %s failed", stream.completion_id)
        yield sse_data(sse_error_body(path, exc), space=True)
    finally:
        with anyio.CancelScope(shield=True):  # free the batch slot even while being cancelled
            await stream.aclose()
    yield _DONE
