"""Body of `POST /v1/score`: (prompt or chat messages, response) pairs for the reward model."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.http.schemas.openai import ChatMessage, flatten_messages

_FORBID = ConfigDict(extra="forbid")


class ScorePair(BaseModel):
    model_config = _FORBID

    prompt: str | None = Field(None, description="The prompt, read as one user turn.")
    messages: list[ChatMessage] | None = Field(None, description="Or the conversation before the response.",
                                               min_length=1)
    response: str = Field(description="The answer to score.")

    @model_validator(mode="after")
    def _one_context(self) -> "ScorePair":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self

    def context(self, index: int) -> str | list[dict]:
        """What the reward client takes: the prompt, or the messages as [{"role", "content": str}]."""
        if self.messages is None:
            return self.prompt
        return flatten_messages(self.messages, param=f"inputs[{index}].messages")


class ScoreRequest(BaseModel):
    model_config = _FORBID
    inputs: list[ScorePair] = Field(description="At most `max_score_batch` pairs (see /info).")


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="One per pair, in order; higher is better.")
    model_version: str
    reward_model_trained: bool = Field(description="False while the reward head is untrained.")
