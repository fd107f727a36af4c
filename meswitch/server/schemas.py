"""Request bodies of the OpenAI-compatible endpoints (the fields meswitch honours).

Unknown fields are accepted and ignored, as OpenAI clients send extras (user, stream_options,
metadata...). Fields meswitch cannot honour with other than their default value are refused
with a 400 rather than silently ignored (n > 1, logprobs, penalties, tools...).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:  # the list form of content: only text parts
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and (len(v) > 4 or not all(isinstance(s, str) and s for s in v)):
            raise ValueError("stop must be a string or up to 4 non-empty strings")
        if isinstance(v, str) and not v:
            raise ValueError("stop must not be empty")
        return v

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name in ("logprobs", "top_logprobs", "tools", "functions", "response_format", "logit_bias", "best_of"):
            value = extra.get(name)
            if value not in (None, False, {}, [], 1 if name == "best_of" else None):
                raise ValueError(f"{name} is not supported by this server")
        for name in ("presence_penalty", "frequency_penalty"):
            if extra.get(name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported by this server")

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


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


class AddExpertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    source: str = Field(description="path of a bundle (on the server) that holds the expert")
    source_name: str | None = None
    overwrite: bool = False
