"""Request and response bodies of the OpenAI-compatible API (pydantic; documented in /openapi.json).

Requests: field names, defaults and ranges follow OpenAI's completions and chat completions APIs.
Types are strict (a number sent as a string is an error, not a guess), as JSON Schema has them: an
integer may be written 2.0, and text must be valid Unicode (no lone surrogate). Extra sampling fields
that OpenAI does not have but other servers accept (top_k, min_p, repetition_penalty) are accepted
too. Unknown fields are ignored, as clients send fields a small server has no use for.

Responses: the JSON OpenAI sends, field for field and in its order; fields this server always
leaves empty (``logprobs``) are still sent, as null. Stream chunks omit what OpenAI omits there
(``usage`` except in the last chunk, and a delta's empty fields).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError


def _unicode(text: str) -> str:
    """Refuse text that is not valid Unicode: JSON can spell a lone surrogate (``"\\ud800"``), which no
    tokenizer can encode and no response can echo."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError("invalid_unicode", "not valid Unicode text: a lone surrogate ({char}) at "
                                  "character {at}", {"char": f"\\u{ord(text[e.start]):04x}", "at": e.start}) from None
    return text


def _integral(value: object) -> object:
    """A float with no fractional part as the integer it is (JSON Schema counts 2.0 as an integer, and
    Python's json writes floats so); anything else as it is, for the strict check to judge."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Text = Annotated[str, AfterValidator(_unicode)]  # every string a request sends
# every integer a request sends (bounds before the validator, or /openapi.json gets "ge" for "minimum")
Integer = Annotated[int, BeforeValidator(_integral)]
Count = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
Seed = Annotated[int, Field(ge=-2 ** 63, le=2 ** 63 - 1), BeforeValidator(_integral)]  # OpenAI's: 64-bit signed


def _non_empty(size_keyword: str) -> FieldInfo:
    """Documents a value in /openapi.json as not empty (``minLength`` or ``minItems`` 1) without checking it:
    the handler refuses an empty prompt with a clearer message than pydantic would for a union."""
    return Field(json_schema_extra={size_keyword: 1})


Prompt = Annotated[Text, _non_empty("minLength")]
TokenIds = Annotated[list[Integer], _non_empty("minItems")]
Prompts = Annotated[list[Prompt], _non_empty("minItems")]
TokenIdLists = Annotated[list[TokenIds], _non_empty("minItems")]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: Text
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Integer = Field(1, ge=1, le=8, description="choices to generate for each prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = Field(None, description="up to 4 strings; the text ends before the first")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: Seed | None = Field(None, description="a signed 64-bit integer; choice i of n draws with seed + i")
    user: Text | None = None
    top_k: Count | None = Field(None, description="lmlab extension: sample among the k most likely tokens")
    min_p: float | None = Field(None, ge=0, le=1, description="lmlab extension: min-p filtering")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="lmlab extension: > 1 penalises repeats")


class CompletionRequest(SamplingFields):
    """POST /v1/completions: continue a prompt (or several)."""

    prompt: Prompt | Prompts | TokenIds | TokenIdLists
    max_tokens: Count | None = 16
    echo: bool = False
    logprobs: Integer | None = None
    best_of: Integer | None = None  # refused above 1 (not supported), as is a suffix
    suffix: Text | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]
    name: Text | None = None

    def text(self) -> str:
        """The message's text (content parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions: the assistant's next turn in a conversation."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    logprobs: bool | None = None
    tools: list[dict] | None = None  # refused (no function calling), as is a response_format other than text
    response_format: dict | None = None


# ---- responses ----

FinishReason = Literal["stop", "length"]  # "stop": a stop token or string; "length": max_tokens or the context


def _is_none(value) -> bool:
    return value is None


class Response(BaseModel):
    """A response body: every field is always sent (documented as required, even when null)."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TextCompletionChoice(Response):
    index: int
    text: str
    logprobs: None = None  # not supported
    finish_reason: FinishReason


class TextCompletion(Response):
    """The answer of POST /v1/completions: one choice per prompt and per n."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextCompletionChoice]
    usage: Usage


class TextCompletionChunkChoice(TextCompletionChoice):
    finish_reason: FinishReason | None = None  # set in the choice's last chunk


class TextCompletionChunk(Response):
    """One server-sent event of a streamed POST /v1/completions; the last one, if
    ``stream_options.include_usage``, has no choices and the usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextCompletionChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_is_none)


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: None = None  # not supported
    finish_reason: FinishReason


class ChatCompletion(Response):
    """The answer of POST /v1/chat/completions: n assistant messages."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """What a stream chunk adds to a message: the role (first chunk), text, or nothing (last chunk)."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)


class ChatCompletionChunkChoice(Response):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None  # set in the choice's last chunk


class ChatCompletionChunk(Response):
    """One server-sent event of a streamed POST /v1/chat/completions; the last one, if
    ``stream_options.include_usage``, has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_is_none)


class Model(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmlab"


class ModelList(Response):
    """The answer of GET /v1/models: the one model this server serves."""

    object: Literal["list"] = "list"
    data: list[Model]


class Health(Response):
    """The answer of GET /health: alive, what it serves, and how busy it is."""

    status: Literal["ok"] = "ok"
    model: str
    queued: int = Field(description="sequences waiting for a batch")
    running: int = Field(description="sequences being generated")
    cache_width: int = Field(description="positions per sequence in the batch's cache: the longest running "
                                         "sequence and the room it may still need (0 when idle)")


class ErrorDetail(Response):
    message: str
    type: str = Field(description="invalid_request_error, not_found_error, rate_limit_error, timeout_error, ...")
    param: str | None = Field(None, description="the request field at fault")
    code: str | None = Field(None, description="a stable name for the error, e.g. context_length_exceeded")


class ErrorResponse(Response):
    """Every error, OpenAI-style: the status says what kind, the body says what and where."""

    error: ErrorDetail
