"""OpenAI requests in, engine requests out; engine outputs in, OpenAI responses and streams out.

The engine does the work: one `RequestStream` per generated choice (``n`` per prompt), read
together through one notifier. This module only translates, so the server stays a thin layer.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from hf_cb.core.sequence import TokenLogprob
from hf_cb.entrypoints.streams import (
    AsyncNotifier,
    EngineDeadError,
    RequestFailed,
    RequestOutput,
    RequestStream,
    iterate_async,
)
from hf_cb.sampling.params import SamplingParams, sample_seed
from hf_cb.server.metrics import Metrics
from hf_cb.server.protocol import ChatCompletionRequest, CompletionRequest


class APIError(Exception):
    """An error the client gets as OpenAI's body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# What reading a request's stream raises when the engine refused, failed or lost it (`engine_error`).
ENGINE_ERRORS = (RequestFailed, EngineDeadError, ValueError)


def engine_error(error: BaseException) -> APIError:
    """The API error for a request the engine refused when it took it (400: it changed since the
    front end checked), failed (500) or could not take (503)."""
    if isinstance(error, EngineDeadError):
        return APIError(503, str(error), type="server_error", code="engine_dead")
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    return APIError(500, str(error), type="server_error")


@dataclass(frozen=True)
class SamplingDefaults:
    """Values of the sampling fields a request leaves out: OpenAI's, unless the model's
    generation config sets its own (as vLLM does with ``--generation-config auto``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_generation_config(cls, config: Any) -> "SamplingDefaults":
        """Only the fields the config sets explicitly (not Transformers' own defaults)."""
        if config is None:
            return cls()
        given = config.to_diff_dict()
        return cls(**{k: given[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                      if given.get(k) is not None})


def generation_defaults(model: Any) -> tuple[SamplingDefaults, tuple[int, ...]]:
    """A model's sampling defaults and EOS token ids, from its generation config."""
    config = model.generation_config
    eos = config.eos_token_id
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return SamplingDefaults.from_generation_config(config), eos_ids


@dataclass
class Serving:
    """What the routes need: the engine, the tokenizer, the served name and the defaults.
    ``online``: an `OnlineEngine`, or the front end's `EngineClient` (the same interface)."""

    online: Any
    tokenizer: Any
    model_name: str
    eos_token_ids: tuple[int, ...]
    metrics: Metrics
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self) -> None:
        self.token_text = functools.lru_cache(maxsize=1 << 18)(self._token_text)

    @classmethod
    def create(cls, online: Any, tokenizer: Any, model_name: str, *, defaults: SamplingDefaults | None = None,
               eos_token_ids: tuple[int, ...] | None = None) -> "Serving":
        """Defaults not given come from the model's generation config (an in-process engine)."""
        if defaults is None or eos_token_ids is None:
            model_defaults, model_eos = generation_defaults(online.engine.model)
            defaults = defaults or model_defaults
            eos_token_ids = model_eos if eos_token_ids is None else eos_token_ids
        return cls(online, tokenizer, model_name, eos_token_ids, Metrics(online), defaults)

    @property
    def max_model_len(self) -> int:
        return self.online.max_model_len

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- requests ------------------------------------------------------------------------------

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_name:
            raise APIError(404, f"The model `{requested}` does not exist.", param="model", code="model_not_found")

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
            texts = [prompt] if isinstance(prompt, str) else prompt
            prompts = [self.tokenizer(t)["input_ids"] for t in texts]
        else:
            prompts = [prompt] if prompt and isinstance(prompt[0], int) else prompt
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        return [list(p) for p in prompts]

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            messages = [{**(m.model_extra or {}), "role": m.role, "content": m.text()} for m in req.messages]
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        except Exception as error:  # the template's own checks (role order, ...) or content types
            raise APIError(400, f"could not apply the chat template: {error}", param="messages") from error

    def params(self, req: CompletionRequest | ChatCompletionRequest, prompt_len: int, logprobs: int | None,
               prompt_param: str) -> SamplingParams:
        d = self.defaults
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        room = self.max_model_len - prompt_len
        if room < 1 or (max_tokens or 0) > room:
            asked = f"{prompt_len} in the {prompt_param}" + (f", {max_tokens} in the completion" if max_tokens else "")
            raise APIError(
                400, f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + (max_tokens or 0)} tokens ({asked}). Please reduce the length of the prompt or "
                "completion.", param=prompt_param, code="context_length_exceeded",
            )
        max_tokens = max_tokens or room  # as vLLM: up to the context
        temperature = d.temperature if req.temperature is None else req.temperature
        top_k = d.top_k if req.top_k is None else max(req.top_k, 0)  # vLLM's -1 means off
        return SamplingParams(
            max_new_tokens=max_tokens, min_new_tokens=min(req.min_tokens, max_tokens),
            do_sample=temperature > 0,  # 0 means greedy, as in the OpenAI API
            temperature=temperature if temperature > 0 else 1.0,
            top_k=top_k, top_p=d.top_p if req.top_p is None else req.top_p,
            min_p=d.min_p if req.min_p is None else req.min_p,
            repetition_penalty=d.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            eos_token_ids=(() if req.ignore_eos else self.eos_token_ids) + tuple(req.stop_token_ids or ()),
            logprobs=logprobs,
        )

    def check(self, req: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]],
              logprobs: int | None, prompt_param: str) -> list[SamplingParams]:
        """Each prompt's sampling parameters; an `APIError` (400) if any request can never run."""
        # Stop token ids become EOS ids, which the engine bans below min_tokens by indexing the
        # logits: one outside the vocabulary would fail the step, and every request in it.
        bad = [t for t in req.stop_token_ids or () if not 0 <= t < self.online.vocab_size]
        if bad:
            raise APIError(400, f"stop_token_ids has token id {bad[0]} outside the vocabulary (size "
                           f"{self.online.vocab_size})", param="stop_token_ids")
        params = [self.params(req, len(p), logprobs, prompt_param) for p in prompts]
        for p, prm in zip(prompts, params):
            try:
                self.online.check_request(p, prm)
            except ValueError as error:
                raise APIError(400, str(error).replace("prompt 0 ", "the prompt "), param=prompt_param) from error
        return params

    def submit(self, req: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]],
               params: list[SamplingParams]) -> list[RequestStream]:
        """``n`` streams per prompt (checked by `check`), choice ``i * n + j`` being sample ``j``
        of prompt ``i``, read together through one notifier."""
        notifier, streams = AsyncNotifier(), []
        try:
            for prompt, prm in zip(prompts, params):
                for j in range(req.n):
                    seed = None if req.seed is None else sample_seed(req.seed, j)
                    streams.append(self.online.submit(
                        prompt, prm, seed, notifier=notifier, stop=req.stop_strings,
                        include_stop=req.include_stop_str_in_output, skip_special_tokens=req.skip_special_tokens,
                    ))
        except BaseException:
            for s in streams:
                s.abort()
            raise
        self.metrics.prompt_tokens.inc(sum(map(len, prompts)))
        return streams


# -- responses -----------------------------------------------------------------------------------


@dataclass
class Choice:
    """One choice being generated: what arrived so far."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.token_ids += out.token_ids
        self.text += out.text
        self.logprobs += out.logprobs or []
        self.finish_reason = out.finish_reason


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def collect(serving: Serving, streams: list[RequestStream]) -> list[Choice]:
    """Every choice, whole (a non-streamed response)."""
    choices = [Choice() for _ in streams]
    async for i, out in iterate_async(streams):
        serving.metrics.observe(out)
        choices[i].add(out)
    return choices


def chat_logprobs(serving: Serving, logprobs: list[TokenLogprob]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = serving.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def completion_logprobs(serving: Serving, logprobs: list[TokenLogprob], offset: int = 0) -> dict:
    tokens = [serving.token_text(lp.token_id) for lp in logprobs]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{serving.token_text(t): v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream_events(serving: Serving, streams: list[RequestStream], *, chat: bool, want_logprobs: bool,
                        include_usage: bool, num_prompt_tokens: int) -> AsyncIterator[str]:
    """The server-sent events of a streamed response, ending with ``data: [DONE]``."""
    head = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": serving.model_name}
    extra = {"usage": None} if include_usage else {}
    completion_tokens, offsets = 0, [0] * len(streams)
    try:
        if chat:  # OpenAI opens each choice with the assistant's role
            yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                            "finish_reason": None} for i in range(len(streams))], **extra})
        async for i, out in iterate_async(streams):
            serving.metrics.observe(out)
            completion_tokens += len(out.token_ids)
            if not out.text and not out.finished and not (want_logprobs and out.token_ids):
                continue  # bytes of a character still incomplete, or held back for a stop string
            logprobs = None
            if want_logprobs:
                logprobs = (chat_logprobs(serving, out.logprobs or []) if chat
                            else completion_logprobs(serving, out.logprobs or [], offsets[i]))
            offsets[i] += len(out.text)
            choice = {"index": i, "logprobs": logprobs, "finish_reason": out.finish_reason}
            choice.update({"delta": {"content": out.text} if out.text or not out.finished else {}} if chat else {"text": out.text})
            yield sse({**head, "choices": [choice], **extra})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(num_prompt_tokens, completion_tokens)})
    except ENGINE_ERRORS as error:
        yield sse(engine_error(error).body())
    yield sse("[DONE]")
