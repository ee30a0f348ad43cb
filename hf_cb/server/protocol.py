"""The OpenAI request bodies the server accepts, as pydantic models, and how a body is parsed.

Every documented field is declared. Fields hf_cb honours carry their OpenAI ranges (so a bad
value is a 400 naming the field); vLLM's extensions (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``, ``prompt_logprobs``,
``return_token_ids``, ...) are accepted too.
Fields hf_cb cannot honour (tools, response formats, logit bias, ...) are refused when set,
rather than silently ignored; pure metadata (``user``, ``metadata``, ``store``, ...) is
accepted. Unknown fields are refused, as the OpenAI API does.

Types are JSON's, strictly, as OpenAI checks them: a boolean is not an integer, a string is not
a number, a float is not an integer; numbers are finite. ``null`` means the default, wherever a
field is optional (OpenAI's schema marks them nullable). Integers the engine stores stay within
64 bits, and text must be valid Unicode (a lone UTF-16 surrogate is refused).
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from hf_cb.sampling.params import INT64, MAX_LOGPROBS
from hf_cb.server.errors import APIError, validation_error

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
R = TypeVar("R", bound=BaseModel)


class _Body(BaseModel):
    """A part of a request body: strict JSON types, ``null`` as the default."""

    model_config = _STRICT

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Body):
    include_usage: bool = False


class _Request(_Body):
    """Fields shared by both endpoints."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # each prompt token's, and its top k
    return_token_ids: bool = False  # the prompt's and each choice's token ids in the response
    return_tokens_as_token_ids: bool = False  # logprobs' tokens as "token_id:N"
    # accepted, and refused when set (see `unsupported`)
    logit_bias: dict[str, float] | None = None

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> dict[str, Any]:
        """Set fields hf_cb cannot honour, with their values."""
        return {"logit_bias": self.logit_bias} if self.logit_bias else {}

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        bad = self.unsupported()
        if bad:
            name = next(iter(bad))
            raise ValueError(f"{name} is not supported by hf_cb (got {bad[name]!r})")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class CompletionRequest(_Request):
    # Strict: pydantic would otherwise take [5, true] as [5, 1] and [5.0] as [5].
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(None, ge=0)  # 0: with echo, the prompt is scored and nothing generated
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @property
    def score_only(self) -> bool:
        """``echo`` with ``max_tokens: 0``: the prompt's log-probabilities, no completion."""
        return self.echo and self.max_tokens == 0

    def unsupported(self) -> dict[str, Any]:
        bad = super().unsupported()
        if self.suffix:
            bad["suffix"] = self.suffix
        if self.best_of not in (None, self.n):
            bad["best_of"] = self.best_of
        return bad


class ContentPart(_Body):
    model_config = ConfigDict(_STRICT, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Body):
    model_config = ConfigDict(_STRICT, extra="allow")  # name, tool_call_id, ...: passed to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str | None:
        if not isinstance(self.content, list):
            return self.content
        kinds = {part.type for part in self.content} - {"text"}
        if kinds:
            raise ValueError(f"message content of type {sorted(kinds)} is not supported by hf_cb (text only)")
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # metadata: accepted, no effect
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    reasoning_effort: str | None = None
    # refused when set
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None

    def unsupported(self) -> dict[str, Any]:
        bad = super().unsupported()
        for name in ("tools", "functions", "function_call", "audio", "prediction", "web_search_options"):
            if getattr(self, name):
                bad[name] = getattr(self, name)
        if self.tool_choice not in (None, "none"):
            bad["tool_choice"] = self.tool_choice
        if self.response_format and self.response_format.get("type") != "text":
            bad["response_format"] = self.response_format
        if self.modalities and self.modalities != ["text"]:
            bad["modalities"] = self.modalities
        return bad

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return self


class TokenizeRequest(_Body):
    """vLLM's ``/tokenize``: a text (``prompt``), or a chat (``messages``) through the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[StrictInt]


def parse_json(body: bytes) -> dict[str, Any]:
    """The JSON object in a request body; `APIError` (400) naming what is wrong. Parsing a large
    body takes time: call it off the event loop."""
    try:
        data = json.loads(body)
    except ValueError as error:  # UnicodeDecodeError too
        raise APIError(400, f"the request body is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    _check_text(data, [])
    return data


def prompt_count(data: dict[str, Any]) -> int:
    """How many prompts a completions body carries, read before it is validated: validating
    50,000 prompts of token ids holds the GIL for 0.2 s, which would stall every stream."""
    prompt = data.get("prompt")
    return len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1


def validate(data: dict[str, Any], cls: type[R]) -> R:
    """``data`` as a ``cls`` request; `APIError` (400) naming the field it refuses."""
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise validation_error(error) from error


def _check_text(value: Any, path: list) -> None:
    """Refuse a string that is not valid Unicode: JSON's ``\\ud800`` escapes can spell a lone
    UTF-16 surrogate, which no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
            raise APIError(400, f"{where}: contains a lone UTF-16 surrogate (U+{ord(value[error.start]):04X}), "
                           "which is not valid Unicode text", param=str(path[0])) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, path + [key])
            _check_text(item, path + [key])
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, path + [i])
