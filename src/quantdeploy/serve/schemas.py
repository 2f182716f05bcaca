"""Request bodies of the HTTP API (pydantic), in OpenAI's shapes, and the error body.

Fields OpenAI defines that this server cannot honour (``n`` > 1, ``logprobs``, ``echo``, tools) are
refused with a 400 naming the field rather than silently ignored; fields it does not know are
ignored, as OpenAI-compatible servers do, so clients that send extra options keep working.
``top_k``, ``repetition_penalty`` and ``ignore_eos`` are the common extensions (vLLM accepts them too).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    user: str | None = None
    ignore_eos: bool = False  # extension (vLLM's): generate to max_tokens, as load tests need

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def unsupported(self) -> str | None:
        """The name of a requested feature this server does not provide, if any."""
        return "n" if self.n != 1 else None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("prompt must be one string (batched prompts: send one request each)")
            value = value[0]
        return value

    def unsupported(self) -> str | None:
        return super().unsupported() or ("echo" if self.echo else None) or ("logprobs" if self.logprobs else None)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = [p.get("text", "") for p in self.content if p.get("type") == "text"]
        if len(parts) != len(self.content):
            raise ValueError("only text content parts are supported")
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    tools: list[dict[str, Any]] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def unsupported(self) -> str | None:
        return super().unsupported() or ("logprobs" if self.logprobs else None) or ("tools" if self.tools else None)


class GenerateRequest(BaseModel):
    """The simple endpoint: ``{prompt, max_length, temperature}``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    max_length: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
