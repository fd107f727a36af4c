"""Request bodies of the OpenAI-compatible endpoints (the fields meswitch honours).

Types are strict, as OpenAI's API checks them: `"stream": "yes"` or `"max_tokens": "5"` is a
400, not coerced. Unknown fields are accepted and ignored, as OpenAI clients send extras (user,
metadata...). Fields meswitch cannot honour with other than their default value are refused
with a 400 rather than silently ignored (n > 1, logprobs, penalties, tools...). A string that
is not valid Unicode anywhere in a body (a lone surrogate such as JSON's "\\ud800") is a 400.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

INT64 = dict(ge=-(2**63), le=2**63 - 1)


def find_invalid_unicode(value, path: str = "") -> str | None:
    """The location of the first string (or object key) in a JSON value that holds a lone
    surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            where = find_invalid_unicode(k, path) or find_invalid_unicode(v, f"{path}.{k}" if path else str(k))
            if where:
                return where
    elif isinstance(value, list):
        for i, v in enumerate(value):
            where = find_invalid_unicode(v, f"{path}[{i}]")
            if where:
                return where
    return None


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        where = find_invalid_unicode(data)
        if where:
            raise ValueError(f"{where}: not valid Unicode (a lone surrogate code point)")
        return data


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] = Field(description="the message text, or a list of text parts")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v):
        if isinstance(v, list):
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ValueError("only text content parts are supported")
        return v

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Sampling(_Body):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, **INT64)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and (len(v) > 4 or not all(s for s in v)):
            raise ValueError("stop must be a string or up to 4 non-empty strings")
        if isinstance(v, str) and not v:
            raise ValueError("stop must not be empty")
        return v

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name in ("logprobs", "top_logprobs", "tools", "functions", "response_format", "logit_bias", "best_of",
                     "tool_choice", "function_call"):
            value = extra.get(name)
            if value not in (None, False, {}, [], "none", 1 if name == "best_of" else None):
                raise ValueError(f"{name} is not supported by this server")
        for name in ("presence_penalty", "frequency_penalty"):
            if extra.get(name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported by this server")

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("send one prompt per request (a list of exactly one string is accepted)")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v


class AddExpertRequest(_Body):
    model_config = ConfigDict(strict=True, extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    source: str = Field(min_length=1, description="path of a bundle on the server (inside one of its source folders)")
    source_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    overwrite: bool = False


__all__ = ["AddExpertRequest", "ChatCompletionRequest", "CompletionRequest", "Message", "find_invalid_unicode"]
