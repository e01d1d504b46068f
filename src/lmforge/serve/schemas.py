"""Request bodies of the OpenAI-compatible endpoints, validated by pydantic (a bad value is a 400 naming it).

Fields follow OpenAI's API; `top_k`, `repetition_penalty` and `ignore_eos` are the usual extensions
(vLLM's names). Unknown fields are ignored, as OpenAI-compatible servers do; fields whose feature this
server lacks (logprobs, echo, suffix, tools, ...) are refused rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmforge.generate import SamplingConfig

MAX_N = 16
MAX_STOP = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Sampling(BaseModel):
    """What completions and chat share: the sampling settings and the stop rule."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None  # what torch.Generator takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    logprobs: bool | int | None = None
    tools: list | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return stops

    def unsupported(self) -> str | None:
        """The name of a requested feature this server does not have, if any."""
        if self.logprobs:
            return "logprobs"
        if self.tools:
            return "tools"
        return None

    def sampling_config(self, max_new_tokens: int, seed_offset: int = 0) -> SamplingConfig:
        """The `lmforge.generate` settings of choice number `seed_offset` (choices of one seeded request
        differ from each other yet are reproducible: seed + index)."""
        seed = None if self.seed is None else self.seed + seed_offset
        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=seed, stop=list(self.stop or []),
                              stop_at_eos=not self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list) -> str | list:
        return _not_empty(value, "prompt")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        """{"role", "content": str} as chat templates expect; "developer" is OpenAI's new name for system."""
        content = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | list) -> str | list:
        return _not_empty(value, "input")


def _not_empty(value: str | list, name: str) -> str | list:
    """A list input (of texts or token ids) must hold something; a string may be empty as OpenAI allows."""
    if isinstance(value, list) and not value:
        raise ValueError(f"{name} must not be an empty list")
    return value
