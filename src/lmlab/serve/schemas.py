"""Request bodies of the OpenAI-compatible API (validated by pydantic; documented in /openapi.json).

Field names, defaults and ranges follow OpenAI's completions and chat completions APIs. Types are
strict (a number sent as a string is an error, not a guess). Extra sampling fields that OpenAI
does not have but other servers accept (top_k, min_p, repetition_penalty) are accepted too.
Unknown fields are ignored, as clients send fields a small server has no use for.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8, description="choices to generate for each prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text ends before the first")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    user: str | None = None
    top_k: int | None = Field(None, ge=1, description="lmlab extension: sample among the k most likely tokens")
    min_p: float | None = Field(None, ge=0, le=1, description="lmlab extension: min-p filtering")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="lmlab extension: > 1 penalises repeats")


class CompletionRequest(SamplingFields):
    """POST /v1/completions: continue a prompt (or several)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        """The message's text (content parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions: the assistant's next turn in a conversation."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
