"""OpenAI request bodies as pydantic models, and OpenAI's error body.

Unknown fields are refused (`extra="forbid"`) rather than silently ignored: a client that sends
`max_token` by mistake should hear about it. Fields OpenAI defines but this server does not implement
are accepted only at their neutral value, and refused with a message naming them otherwise.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error with an HTTP status and OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field."""
    err = e.errors()[0]
    param = ".".join(str(x) for x in err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        msg = f"unknown field {param!r}: this server does not accept it"
    elif kind == "missing":
        msg = f"missing required field {param!r}"
    else:
        msg = f"invalid value for {param!r}: {err.get('msg', 'invalid')}"
        if "input" in err and kind not in ("model_type",):
            msg += f" (got {str(err['input'])[:80]!r})"
    return APIError(400, msg, param=param or None, code="invalid_value" if kind != "extra_forbidden" else
                    "unknown_field")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoiceFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class _Sampling(_Strict):
    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    n: int = Field(1, ge=1, le=16)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks, load tests)
    presence_penalty: Optional[float] = Field(None, ge=0.0, le=0.0)  # accepted only as 0 (not implemented)
    frequency_penalty: Optional[float] = Field(None, ge=0.0, le=0.0)  # accepted only as 0 (not implemented)
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=0)  # accepted only empty

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        return stops


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return v


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int = Field(16, ge=1)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    suffix: Optional[str] = Field(None, max_length=0)  # accepted only empty (no fill-in-the-middle)
    best_of: Optional[int] = Field(None, ge=1)
