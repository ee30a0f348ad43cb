"""OpenAI requests in, engine requests out: prompts, sampling parameters, and their checks.

The engine does the work: one `RequestStream` per generated choice (``n`` per prompt), read
together through one notifier. This module only translates, so the server stays a thin layer;
`responses` turns the streams' outputs into OpenAI's responses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from hf_cb.entrypoints.streams import AsyncNotifier, RequestStream
from hf_cb.sampling.params import SamplingParams, sample_seed
from hf_cb.server.errors import APIError
from hf_cb.server.metrics import Metrics
from hf_cb.server.protocol import ChatCompletionRequest, CompletionRequest


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
    max_prompts: int = 1024  # prompts one request may carry (`ServerOptions.max_prompts`)

    def __post_init__(self) -> None:
        self.token_text = functools.lru_cache(maxsize=1 << 18)(self._token_text)

    @classmethod
    def create(cls, online: Any, tokenizer: Any, model_name: str, *, defaults: SamplingDefaults | None = None,
               eos_token_ids: tuple[int, ...] | None = None, max_prompts: int = 1024) -> "Serving":
        """Defaults not given come from the model's generation config (an in-process engine)."""
        if defaults is None or eos_token_ids is None:
            model_defaults, model_eos = generation_defaults(online.engine.model)
            defaults = defaults or model_defaults
            eos_token_ids = model_eos if eos_token_ids is None else eos_token_ids
        return cls(online, tokenizer, model_name, eos_token_ids, Metrics(online), defaults, max_prompts)

    @property
    def max_model_len(self) -> int:
        return self.online.max_model_len

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- requests ------------------------------------------------------------------------------

    def check_model(self, requested: str | None) -> None:
        check_model(requested, self.model_name)

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """The prompts' token ids. Text is tokenized up to one token past the context (a longer
        prompt is refused all the same, and a huge one would cost a list of all its ids); slow
        for large inputs: call it off the event loop."""
        prompt = req.prompt
        one = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))  # a text, or one prompt's ids
        prompts = [prompt] if one else prompt
        if prompts and isinstance(prompts[0], str):
            prompts = self.tokenizer(prompts, truncation=True, max_length=self.max_model_len + 1)["input_ids"]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        return [list(p) for p in prompts]

    def check_count(self, num_prompts: int) -> None:
        """A 400 for more prompts in one request than the server takes."""
        if num_prompts > self.max_prompts:
            raise APIError(400, f"the request has {num_prompts} prompts; this server takes at most {self.max_prompts} "
                           "per request (--max-prompts-per-request)", param="prompt")

    def echo_texts(self, req: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """Each prompt's text for ``echo``: as given, or its token ids decoded."""
        given = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if given and isinstance(given[0], str):
            return list(given)
        return [self.tokenizer.decode(p) for p in prompts]

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        """The chat's token ids through the tokenizer's template (up to one token past the
        context, as `completion_prompts`); call it off the event loop."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            messages = [{**(m.model_extra or {}), "role": m.role, "content": m.text()} for m in req.messages]
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False, truncation=True,
                                                           max_length=self.max_model_len + 1))
        except Exception as error:  # the template's own checks (role order, ...) or content types
            raise APIError(400, f"could not apply the chat template: {error}", param="messages") from error

    def params(self, req: CompletionRequest | ChatCompletionRequest, prompt_len: int, logprobs: int | None,
               prompt_param: str) -> SamplingParams:
        d = self.defaults
        # echo with max_tokens 0 scores the prompt: one token is generated, and dropped (`responses`).
        max_tokens = 1 if getattr(req, "score_only", False) else (
            getattr(req, "max_completion_tokens", None) or req.max_tokens)
        room = self.max_model_len - prompt_len
        if prompt_len > self.max_model_len:  # text is tokenized up to one token past the context
            has = f"more than {self.max_model_len}" if prompt_len == self.max_model_len + 1 else prompt_len
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, the "
                           f"{prompt_param} has {has} tokens. Please reduce its length.",
                           param=prompt_param, code="context_length_exceeded")
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
            logprobs=logprobs, prompt_logprobs=prompt_logprobs(req, logprobs),
        )

    def check(self, req: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]],
              logprobs: int | None, prompt_param: str) -> list[SamplingParams]:
        """Each prompt's sampling parameters; an `APIError` (400) if any request can never run."""
        # Stop token ids become EOS ids, which the engine bans below min_tokens by indexing the
        # logits: one outside the vocabulary would fail the step, and every request in it.
        if getattr(req, "max_tokens", None) == 0 and not getattr(req, "echo", False):
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo, to score the prompt)",
                           param="max_tokens")
        vocab = self.online.vocab_size
        bad = [t for t in req.stop_token_ids or () if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"stop_token_ids has token id {bad[0]} outside the vocabulary (size {vocab})",
                           param="stop_token_ids")
        if req.top_k is not None and req.top_k > vocab:
            raise APIError(400, f"top_k must be at most the vocabulary size ({vocab}), or -1 or 0 for no limit; "
                           f"got {req.top_k}", param="top_k")
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


def prompt_logprobs(req: CompletionRequest | ChatCompletionRequest, logprobs: int | None) -> int | None:
    """How many alternatives each prompt token's log-probability needs: vLLM's
    ``prompt_logprobs``, and with ``echo`` the ``logprobs`` the echoed prompt shows."""
    wants = [k for k in (req.prompt_logprobs, logprobs if getattr(req, "echo", False) else None) if k is not None]
    return max(wants) if wants else None


def check_model(requested: str | None, served: str) -> None:
    """A 404, as OpenAI's, unless ``requested`` (None: any) is the ``served`` name."""
    if requested is not None and requested != served:
        raise APIError(404, f"The model `{requested}` does not exist.", param="model", code="model_not_found")
