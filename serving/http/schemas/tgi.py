"""Request and answer bodies of the TGI-compatible routes (text-generation-inference 2.x).

Requests are what `text_generation.Client` sends: it posts every parameter, unset ones as null, so
each unsupported feature is accepted at its "off" value and refused (422, a sentence saying so)
only when a client actually asks for it. Unknown fields are refused too (TGI ignores them; a typo
silently ignored is worse than a 422).

Range checks use TGI's own messages, so a client sees the same words from either server.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.engine.types import MAX_STOP_SEQUENCES, SamplingParams
from serving.errors import ValidationError
from serving.http.errors import InvalidParam

_FORBID = ConfigDict(extra="forbid")


class Grammar(BaseModel):
    model_config = _FORBID
    type: Literal["json", "regex", "json_schema"]
    value: str | dict


class Parameters(BaseModel):
    model_config = _FORBID

    best_of: int | None = Field(None, description="Only 1 is supported.")
    decoder_input_details: bool = Field(False, description="Prompt token logprobs; not supported (false only).")
    details: bool = Field(False, description="Return finish reason, token ids and logprobs.")
    do_sample: bool = Field(False, description="Sample; also implied by temperature, top_k or top_p.")
    frequency_penalty: float | None = Field(None, description="Not supported (null or 0 only).")
    grammar: Grammar | None = Field(None, description="Not supported (null only).")
    max_new_tokens: int | None = Field(None, description="Default: the server's max_new_tokens_default.",
                                       json_schema_extra={"minimum": 1})
    repetition_penalty: float | None = Field(None, json_schema_extra={"exclusiveMinimum": 0})
    return_full_text: bool | None = Field(False, description="Prepend the prompt to generated_text.")
    seed: int | None = Field(None, json_schema_extra={"minimum": 0})
    stop: list[str] = Field(default_factory=list, description="Stop sequences; kept in generated_text.",
                            json_schema_extra={"maxItems": MAX_STOP_SEQUENCES})
    temperature: float | None = Field(None, json_schema_extra={"exclusiveMinimum": 0})
    top_k: int | None = Field(None, json_schema_extra={"minimum": 1})
    top_n_tokens: int | None = Field(None, description="Not supported (null or 0 only).")
    top_p: float | None = Field(None, json_schema_extra={"exclusiveMinimum": 0, "exclusiveMaximum": 1})
    truncate: int | None = Field(None, description="Not supported (null only).")
    typical_p: float | None = Field(None, description="Not supported (null only).")
    watermark: bool = Field(False, description="Not supported (false only).")
    adapter_id: str | None = Field(None, description="Not supported (null only).")

    def to_sampling(self, *, default_max_new_tokens: int, max_total_tokens: int) -> SamplingParams:
        """Check the parameters as TGI's router does and map them onto the engine's."""
        self._refuse_unsupported()
        if self.temperature is not None and not self.temperature > 0:
            raise InvalidParam("`temperature` must be strictly positive", "temperature")
        if self.top_p is not None and not 0.0 < self.top_p < 1.0:
            raise InvalidParam("`top_p` must be > 0.0 and < 1.0", "top_p")
        if self.top_k is not None and self.top_k <= 0:
            raise InvalidParam("`top_k` must be strictly positive", "top_k")
        max_new = self.max_new_tokens if self.max_new_tokens is not None else default_max_new_tokens
        if max_new <= 0:
            raise InvalidParam("`max_new_tokens` must be strictly positive", "max_new_tokens")
        if max_new > max_total_tokens:
            raise InvalidParam(f"`max_new_tokens` must be <= {max_total_tokens}. Given: {max_new}",
                               "max_new_tokens")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidParam(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. "
                               f"Given: {len(self.stop)}", "stop")
        # TGI samples when asked to, or when any warper would change the distribution.
        sampling = (self.do_sample or (self.temperature is not None and self.temperature != 1.0)
                    or self.top_k is not None or self.top_p is not None)
        return SamplingParams(
            max_new_tokens=max_new, do_sample=sampling,
            temperature=self.temperature if self.temperature is not None else 1.0,
            top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
            stop=tuple(self.stop), seed=self.seed, logprobs=True)

    def _refuse_unsupported(self) -> None:
        if self.best_of is not None and self.best_of != 1:
            raise InvalidParam(f"`best_of` must be > 0 and <= 1. Given: {self.best_of}", "best_of")
        if self.decoder_input_details:
            raise InvalidParam("`decoder_input_details` is not supported by this server",
                               "decoder_input_details")
        if self.frequency_penalty not in (None, 0.0):
            raise InvalidParam("`frequency_penalty` is not supported by this server; use "
                               "`repetition_penalty`", "frequency_penalty")
        if self.grammar is not None:
            raise InvalidParam("grammar is not supported by this server", "grammar")
        if self.top_n_tokens not in (None, 0):
            raise InvalidParam(f"`top_n_tokens` must be >= 0 and <= 0. Given: {self.top_n_tokens}",
                               "top_n_tokens")
        if self.truncate is not None:
            raise InvalidParam("`truncate` is not supported by this server; send a shorter `inputs`",
                               "truncate")
        if self.typical_p is not None:
            raise InvalidParam("`typical_p` is not supported by this server", "typical_p")
        if self.watermark:
            raise InvalidParam("`watermark` is not supported by this server", "watermark")
        if self.adapter_id:
            raise InvalidParam("adapters are not supported by this server (`adapter_id`)", "adapter_id")


class GenerateRequest(BaseModel):
    """Body of `/generate`, `/generate_stream` and `/` (where `stream` picks the answer's form)."""

    model_config = _FORBID

    inputs: str = Field(description="The prompt.")
    parameters: Parameters | None = None
    stream: bool = Field(False, description="Only read by `POST /`: answer with server-sent events.")

    def sampling(self, *, default_max_new_tokens: int, max_total_tokens: int) -> SamplingParams:
        if not self.inputs:
            raise ValidationError("`inputs` cannot be empty")
        return self.params.to_sampling(default_max_new_tokens=default_max_new_tokens,
                                       max_total_tokens=max_total_tokens)

    @property
    def params(self) -> Parameters:
        return self.parameters or Parameters()


# -- answers (documented in the OpenAPI spec; the routes build them as plain dicts) ---------------

class TokenOut(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[TokenOut] = Field(description="Always empty: prompt logprobs are not computed.")
    tokens: list[TokenOut]
    top_tokens: list[list[TokenOut]] = Field(description="Always empty (top_n_tokens is not supported).")


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = Field(None, description="Present when `parameters.details` is true.")


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamEvent(BaseModel):
    """One `data:` event of `/generate_stream`; the last one carries generated_text (and details)."""

    index: int
    token: TokenOut
    top_tokens: list[TokenOut] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorBody(BaseModel):
    error: str
    error_type: str


class Info(BaseModel):
    """TGI's /info, plus the feedloop fields model_version, reward_model_version, reward_model_trained,
    max_batch_size (requests decoded together) and max_queue (waiting beyond those)."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_input_length: int
    max_total_tokens: int
    max_client_batch_size: int
    validation_workers: int
    version: str
    sha: str | None
    docker_label: str | None
    router: str
    model_version: str
    reward_model_version: str
    reward_model_trained: bool
    max_batch_size: int
    max_queue: int


ERROR_RESPONSES: dict = {
    code: {"model": ErrorBody, "description": text} for code, text in [
        (413, "Request body too large"), (422, "Invalid request (bad or unsupported parameter, prompt too long)"),
        (424, "Generation failed"), (429, "Model is overloaded: retry later"), (503, "Engine unavailable")]
}
