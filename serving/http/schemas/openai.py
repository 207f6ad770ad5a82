"""Request bodies of the OpenAI-compatible routes and their mapping onto the engine's SamplingParams.

What is refused, and why: this server returns one choice per request with the chosen tokens'
logprobs only, and has no tools, grammars or logit biases. Such requests get a 400 naming the
parameter rather than an answer that silently ignores it. Parameters at their "off" value (null, 0,
1 for `n`) are accepted, since some clients always send them. Unknown fields are refused, as
OpenAI does ("Unrecognized request argument supplied").

Any `model` name is accepted and answered by the served model (TGI does the same; the
`text_generation` client always sends "tgi"); `/v1/models` tells the real name.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.engine.types import MAX_STOP_SEQUENCES, SamplingParams
from serving.http.errors import InvalidParam

try:  # chat templates are Jinja; a template may refuse a conversation (e.g. roles out of order)
    from jinja2 import TemplateError as ChatTemplateError
except ImportError:  # pragma: no cover - engines without templates never raise it
    ChatTemplateError = ValueError

_FORBID = ConfigDict(extra="forbid")


class ContentPart(BaseModel):
    # Extra keys allowed so that an image part parses and gets a clear "text only" answer below.
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = _FORBID
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


def flatten_messages(messages: list[ChatMessage], param: str = "messages") -> list[dict]:
    """OpenAI messages → [{"role", "content": str}], what chat templates expect. Text parts are
    joined with newlines (as vLLM does)."""
    out = []
    for i, m in enumerate(messages):
        if m.tool_calls:
            raise InvalidParam("tool calls are not supported by this server", f"{param}[{i}].tool_calls")
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                raise InvalidParam("only text content parts are supported by this server",
                                   f"{param}[{i}].content")
            content = "\n".join(p.text for p in m.content)
        else:
            content = m.content or ""
        out.append({"role": m.role, "content": content})
    return out


class StreamOptions(BaseModel):
    model_config = _FORBID
    include_usage: bool | None = Field(None, description="Send a last chunk with the token counts.")
    include_obfuscation: bool | None = Field(None, description="Accepted and ignored.")


class _Common(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = _FORBID

    model: str | None = Field(None, description="Any name is accepted; the served model answers.")
    frequency_penalty: float | None = Field(None, description="Not supported (0 only).")
    logit_bias: dict[str, float] | list[float] | None = Field(None, description="Not supported (empty only).")
    max_tokens: int | None = Field(None, json_schema_extra={"minimum": 1})
    n: int | None = Field(None, description="Only 1 is supported.")
    presence_penalty: float | None = Field(None, description="Not supported (0 only).")
    repetition_penalty: float | None = Field(None, description="Extension (TGI/vLLM): 1.0 is none.",
                                             json_schema_extra={"exclusiveMinimum": 0})
    seed: int | None = Field(None, json_schema_extra={"minimum": 0})
    stop: str | list[str] | None = Field(None, description="Left out of the returned text, as OpenAI does.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, description="Default 1.0 (sampling); 0 is greedy.",
                                      json_schema_extra={"minimum": 0, "maximum": 2})
    top_k: int | None = Field(None, description="Extension (vLLM): -1 or null is off.")
    top_p: float | None = Field(None, json_schema_extra={"exclusiveMinimum": 0, "maximum": 1})
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def _sampling(self, max_tokens: int | None, max_tokens_param: str, *, default_max_new_tokens: int,
                  max_total_tokens: int) -> SamplingParams:
        if self.n not in (None, 1):
            raise InvalidParam("`n` must be 1: this server returns one choice per request (send several "
                               "requests for several choices)", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise InvalidParam(f"`{name}` is not supported by this server (0 only); "
                                   "`repetition_penalty` is", name)
        if self.logit_bias:
            raise InvalidParam("`logit_bias` is not supported by this server", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise InvalidParam("`stream_options` is only allowed when `stream` is true", "stream_options")
        temperature = 1.0 if self.temperature is None else self.temperature
        if not 0.0 <= temperature <= 2.0:
            raise InvalidParam("`temperature` must be between 0 and 2", "temperature")
        max_new = default_max_new_tokens if max_tokens is None else max_tokens
        if max_new < 1:
            raise InvalidParam(f"`{max_tokens_param}` must be at least 1", max_tokens_param)
        if max_new > max_total_tokens:
            raise InvalidParam(f"`{max_tokens_param}` must be <= {max_total_tokens}. Given: {max_new}",
                               max_tokens_param)
        if len(self.stop_sequences) > MAX_STOP_SEQUENCES:
            raise InvalidParam(f"`stop` supports up to {MAX_STOP_SEQUENCES} sequences", "stop")
        top_k = None if self.top_k in (None, -1, 0) else self.top_k
        # OpenAI samples by default (temperature 1); temperature 0 makes SamplingParams greedy.
        return SamplingParams(max_new_tokens=max_new, do_sample=True, temperature=temperature, top_k=top_k,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                              stop=self.stop_sequences, seed=self.seed, logprobs=True)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="Takes precedence over max_tokens.",
                                              json_schema_extra={"minimum": 1})
    logprobs: bool | None = Field(False, description="Return the chosen tokens' logprobs.")
    top_logprobs: int | None = Field(None, description="Only 0 is supported.")
    tools: list[dict] | None = Field(None, description="Not supported (empty only).")
    tool_choice: str | dict | None = Field(None, description="Only \"none\" or \"auto\" without tools.")
    parallel_tool_calls: bool | None = None
    response_format: dict | None = Field(None, description='Only {"type": "text"}.')

    def sampling(self, *, default_max_new_tokens: int, max_total_tokens: int) -> SamplingParams:
        if self.top_logprobs not in (None, 0):
            raise InvalidParam("`top_logprobs` is not supported by this server (0 only): the logprobs of "
                               "the chosen tokens come with `logprobs: true`", "top_logprobs")
        if self.tools or self.tool_choice not in (None, "none", "auto"):
            raise InvalidParam("tools are not supported by this server", "tools")
        if self.response_format not in (None, {"type": "text"}):
            raise InvalidParam('`response_format` is not supported by this server (only {"type": "text"})',
                               "response_format")
        if self.max_completion_tokens is not None:
            max_tokens, name = self.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, name = self.max_tokens, "max_tokens"
        return self._sampling(max_tokens, name, default_max_new_tokens=default_max_new_tokens,
                              max_total_tokens=max_total_tokens)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="One text prompt.")
    echo: bool | None = Field(False, description="Prepend the prompt to the returned text.")
    logprobs: int | None = Field(None, description="Only 0 is supported: the chosen tokens' logprobs.")
    suffix: str | None = Field(None, description="Not supported (null only).")
    best_of: int | None = Field(None, description="Only 1 is supported.")

    @property
    def prompt_text(self) -> str:
        p = self.prompt
        if isinstance(p, str):
            return p
        if len(p) == 1 and isinstance(p[0], str):
            return p[0]
        if all(isinstance(x, str) for x in p):
            raise InvalidParam("`prompt` must hold one prompt: send one request per prompt", "prompt")
        raise InvalidParam("token-id prompts are not supported by this server: send text", "prompt")

    def sampling(self, *, default_max_new_tokens: int, max_total_tokens: int) -> SamplingParams:
        if self.logprobs not in (None, 0):
            raise InvalidParam("`logprobs` must be 0 or null: this server returns the chosen tokens' "
                               "logprobs only, not the top alternatives", "logprobs")
        if self.suffix:
            raise InvalidParam("`suffix` is not supported by this server", "suffix")
        if self.best_of not in (None, 1):
            raise InvalidParam("`best_of` must be 1", "best_of")
        self.prompt_text  # noqa: B018 - refuse batched / token-id prompts before generating
        return self._sampling(self.max_tokens, "max_tokens", default_max_new_tokens=default_max_new_tokens,
                              max_total_tokens=max_total_tokens)


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error | rate_limit_error | server_error")
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str | None = Field(description="e.g. context_length_exceeded, model_overloaded, invalid_json")


class OpenAIErrorBody(BaseModel):
    """Error body of every /v1 route."""

    error: OpenAIError
