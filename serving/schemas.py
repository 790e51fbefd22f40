"""OpenAI-compatible request bodies (pydantic only here, at the HTTP boundary)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from shards.step import SamplingParams

MAX_TOKENS_LIMIT = 4096


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class _Sampling(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop strings")
        return v

    def sampling(self, default_max: int = 256) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=self.seed, max_tokens=self.max_completion_tokens or self.max_tokens
                              or default_max, stop=stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str


class ShardPatch(BaseModel):
    """PATCH /v1/shards/{k}: the bytes shard k may hold for its tensors (null: no budget)."""

    model_config = {"extra": "forbid"}
    budget_bytes: int | None = Field(..., ge=0)
