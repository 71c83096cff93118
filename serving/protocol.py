"""The OpenAI API's request bodies, validated at the edge, and its error shape.

Only what the engine honours is accepted: an unknown field, or a known one at a value outside what
it honours (vLLM's ranges: `top_k` -1/0 off or >= 1, `min_p` in [0, 1], presence/frequency penalties
in [-2, 2], `repetition_penalty` > 0), is a 400 naming it rather than a silently different answer.
/v1/completions takes the legacy API's four prompt forms: a string, a list of token ids, a list of
strings, a list of token-id lists (a batch: one choice per prompt, times `n`).
Errors use OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, so the official
`openai` client raises its usual exceptions with our message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 8


class APIError(Exception):
    """An error response: HTTP status, message, the request field it concerns, OpenAI's type/code."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_exceeded", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a replica (the `deploy:` params; serving/app.py ServeArgs)."""

    max_body_bytes: int = 1 << 20          # a larger body is a 413 before it is read
    max_prompt_tokens: int | None = None   # None: the context less one token
    max_stop_chars: int = 64               # each stop string (text streams hold back up to this much)
    max_top_logprobs: int = 20             # the most `top_logprobs` a request may ask (vLLM's max_logprobs)
    retry_after_s: int = 1                 # Retry-After of a 429 (the engine's queue, Serve's queue)

    def check_stops(self, stops: list[str]) -> None:
        for i, stop in enumerate(stops):
            if len(stop) > self.max_stop_chars:
                raise APIError(400, f"stop: stop sequence {i} has {len(stop)} characters; at most "
                                    f"{self.max_stop_chars} are accepted", "stop")

    def check_logprobs(self, top: int | None, field: str) -> None:
        if top is not None and top > self.max_top_logprobs:
            raise APIError(400, f"{field}: at most {self.max_top_logprobs} are served (max_top_logprobs), "
                                f"got {top}", field)

    def check_prompt(self, tokens: int, context: int, field: str) -> None:
        """A prompt must leave room for one generated token, and stay within `max_prompt_tokens`."""
        limit = min(self.max_prompt_tokens or context - 1, context - 1)
        if tokens > limit:
            what = (f"this model's maximum context length is {context} tokens" if limit == context - 1
                    else f"this server accepts at most {limit} prompt tokens (max_prompt_tokens)")
            raise APIError(400, f"{field}: {tokens} tokens; {what}", field, "context_length_exceeded")

    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's validation errors → one 400 naming the first bad field (`messages.0.content`)."""
    error = errors[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body" and not _is_union_tag(str(part))]
    if error.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
    param = ".".join(loc) or None
    message = error["msg"].removeprefix("Value error, ")
    if error.get("type") == "missing":
        message = "required field is missing"
    elif error.get("type") == "extra_forbidden":
        message = "unknown field (not supported by this server)"
    return APIError(400, f"{param}: {message}" if param else message, param)


def _is_union_tag(part: str) -> bool:
    """pydantic names the union member that failed in the location (`prompt.str`, `stop.list[str]`)."""
    return part in ("str", "int", "float", "bool", "list", "dict", "none") or "[" in part


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Generation(BaseModel):
    """The sampling fields both endpoints share (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    user: str | None = None
    top_k: int = -1                                       # -1 or 0: off
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value):
        if value < -1:
            raise ValueError(f"must be -1 or 0 (off) or >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _usage_needs_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def token_limit(self) -> int | None:
        return self.max_tokens


PROMPT_FORMS = "a string, a list of token ids, a list of strings or a list of token-id lists"


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


class CompletionRequest(_Generation):
    prompt: list[str] | list[list[int]]   # normalized: a batch of strings or of token-id lists
    max_tokens: int | None = Field(16, ge=1)
    echo: StrictBool | None = False
    logprobs: StrictInt | None = Field(None, ge=0)  # top N per token (vLLM: up to max_logprobs)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, str) or _token_ids(value):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be {PROMPT_FORMS} (non-empty)")
        if not (all(isinstance(p, str) for p in value) or all(isinstance(p, list) for p in value)):
            raise ValueError(f"a batch is all strings or all token-id lists ({PROMPT_FORMS})")
        for i, prompt in enumerate(value):
            if isinstance(prompt, str) and not prompt:
                raise ValueError(f"prompt {i} is an empty string")
            if isinstance(prompt, list) and not _token_ids(prompt):
                raise ValueError(f"prompt {i} is not a non-empty list of integer token ids ({PROMPT_FORMS})")
            if isinstance(prompt, list) and min(prompt) < 0:
                raise ValueError(f"prompt {i} has the negative token id {min(prompt)}")
        return value

    def top_logprobs_asked(self) -> int | None:
        """How many top tokens each generated token reports (None: no logprobs)."""
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0)  # top N per token; needs logprobs (OpenAI: up to 20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("only allowed when logprobs is true")
        return value

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
