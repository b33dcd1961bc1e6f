"""The OpenAI-compatible request schemas, limits, and error shape.

Requests are validated here and every problem becomes a 4xx `{"error": {"message", "type",
"param", "code"}}` that names the offending field, as OpenAI's API does.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4
# What a torch.Generator accepts as a seed (int64 and uint64 together).
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                              413: "invalid_request_error", 429: "rate_limit_error",
                              503: "server_error"}.get(status, "server_error")

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted for client compatibility only at their neutral values.
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return None

    def stops(self) -> list[str]:
        return list(self.stop or [])

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = Field(default=False)
    best_of: int | None = Field(default=None, ge=1, le=1)
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt is supported per request")
            v = v[0]
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v


class TextPart(BaseModel):
    """One part of a message's content in OpenAI's list form; only text parts can be served."""
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _join_parts(cls, v):
        return v if isinstance(v, str) else "".join(part.text for part in v)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse(body: bytes, schema: type[BaseModel], max_bytes: int) -> Any:
    """Size check, JSON parse and schema validation, each failure an APIError naming the field."""
    if len(body) > max_bytes:
        raise APIError(413, f"request body is {len(body)} bytes; the limit is {max_bytes}", code="body_too_large")
    try:
        raw = json.loads(body, parse_constant=_no_constant)
        # Every string must be real Unicode: a lone surrogate ("\ud800") decodes but cannot be encoded.
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except UnicodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 text: {e.reason}", code="invalid_json") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, NaN/Infinity, a number of 4,300+ digits
        raise APIError(400, f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ())]
        param = ".".join(loc) or None
        if err.get("type") == "extra_forbidden":
            message = f"unrecognized request argument: {param}"
        else:
            message = f"{param}: {err['msg']}" if param else err["msg"]
        raise APIError(400, message, param=param, code="invalid_value") from None
