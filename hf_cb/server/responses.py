"""Engine outputs in, OpenAI responses out: whole responses, server-sent events, log-probabilities."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from hf_cb.core.sequence import TokenLogprob
from hf_cb.entrypoints.streams import RequestOutput, RequestStream, iterate_async
from hf_cb.server.errors import ENGINE_ERRORS, engine_error
from hf_cb.server.protocol import ChatCompletionRequest
from hf_cb.server.serving import Serving


@dataclass(frozen=True)
class ResponseShape:
    """What a response shows besides the completions: the request's options that shape it.

    ``prompts``: each prompt's token ids (choice ``i`` is a sample of prompt ``i // n``);
    ``echo_texts``: with ``echo``, each prompt's text; ``score_only``: ``echo`` with
    ``max_tokens: 0`` (the one generated token is dropped); ``prompt_logprobs``: vLLM's field in
    each choice; ``return_token_ids``: vLLM's ``prompt_token_ids`` and ``token_ids``;
    ``tokens_as_ids``: logprobs' tokens as ``token_id:N``."""

    chat: bool
    want_logprobs: bool
    prompts: list[list[int]]
    n: int = 1
    echo_texts: list[str] | None = None
    score_only: bool = False
    prompt_logprobs: bool = False
    return_token_ids: bool = False
    tokens_as_ids: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @classmethod
    def of(cls, req: Any, prompts: list[list[int]], logprobs: int | None,
           echo_texts: list[str] | None = None) -> "ResponseShape":
        """The shape a request asks for (``logprobs``: the alternatives it asked, None for none)."""
        return cls(isinstance(req, ChatCompletionRequest), logprobs is not None, prompts, req.n, echo_texts,
                   score_only=getattr(req, "score_only", False), prompt_logprobs=req.prompt_logprobs is not None,
                   return_token_ids=req.return_token_ids, tokens_as_ids=req.return_tokens_as_token_ids)


@dataclass
class Choice:
    """One choice being generated: what arrived so far."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, out: RequestOutput, score_only: bool = False) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.finish_reason = out.finish_reason
        if not score_only:  # echo with max_tokens 0: the generated token is not shown
            self.token_ids += out.token_ids
            self.text += out.text
            self.logprobs += out.logprobs or []


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def collect(serving: Serving, streams: list[RequestStream], shape: ResponseShape) -> list[Choice]:
    """Every choice, whole (a non-streamed response)."""
    choices = [Choice() for _ in streams]
    async for i, out in iterate_async(streams):
        serving.metrics.observe(out)
        choices[i].add(out, shape.score_only)
    return choices


def token_text(serving: Serving, token_id: int, shape: ResponseShape) -> str:
    return f"token_id:{token_id}" if shape.tokens_as_ids else serving.token_text(token_id)


def chat_logprobs(serving: Serving, logprobs: list[TokenLogprob], shape: ResponseShape) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(serving, token_id, shape)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def completion_logprobs(serving: Serving, logprobs: list[TokenLogprob | None], shape: ResponseShape,
                        offset: int = 0, token_ids: list[int] | None = None) -> dict:
    """The legacy completions format lm-eval parses. ``token_ids``: the tokens, where an entry is
    None (the first echoed prompt token, which nothing scores)."""
    ids = token_ids or [lp.token_id for lp in logprobs]
    tokens = [token_text(serving, t, shape) for t in ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [None if lp is None else lp.logprob for lp in logprobs],
        "top_logprobs": [None if lp is None else {token_text(serving, t, shape): v for t, v in lp.top}
                         for lp in logprobs],
        "text_offset": offsets,
    }


def vllm_prompt_logprobs(serving: Serving, entries: list[TokenLogprob | None], shape: ResponseShape) -> list:
    """vLLM's ``prompt_logprobs``: per prompt token, None for the first, then ``{token id: {logprob,
    rank, decoded_token}}`` for the token and its most likely alternatives."""
    def item(token_id: int, logprob: float, rank: int | None) -> tuple[str, dict]:
        return str(token_id), {"logprob": logprob, "rank": rank,
                               "decoded_token": token_text(serving, token_id, shape)}

    out: list = []
    for lp in entries:
        if lp is None:
            out.append(None)
            continue
        alternatives = dict(item(t, v, r) for r, (t, v) in enumerate(lp.top, start=1))
        out.append({**alternatives, **dict([item(lp.token_id, lp.logprob, lp.rank)])})
    return out


def echoed(serving: Serving, shape: ResponseShape, index: int, choice: Choice) -> tuple[str, dict | None]:
    """A completion choice's text and logprobs with its prompt in front (``echo``)."""
    prompt = shape.prompts[index // shape.n]
    text = shape.echo_texts[index // shape.n] + choice.text
    if not shape.want_logprobs:
        return text, None
    scored = choice.prompt_logprobs or [None] * len(prompt)
    return text, completion_logprobs(serving, [*scored, *choice.logprobs], shape,
                                     token_ids=[*prompt, *(lp.token_id for lp in choice.logprobs)])


def choice_extras(serving: Serving, shape: ResponseShape, index: int, choice: Choice) -> dict:
    """vLLM's fields a choice carries when asked for."""
    extras = {}
    if shape.prompt_logprobs:
        extras["prompt_logprobs"] = vllm_prompt_logprobs(serving, choice.prompt_logprobs or [], shape)
    if shape.return_token_ids:
        if not shape.chat:
            extras["prompt_token_ids"] = shape.prompts[index // shape.n]
        extras["token_ids"] = choice.token_ids
    return extras


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream_events(serving: Serving, streams: list[RequestStream], shape: ResponseShape, *,
                        include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed response, ending with ``data: [DONE]``. A choice's
    first event carries its echoed prompt and vLLM's per-choice fields."""
    chat = shape.chat
    head = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": serving.model_name}
    extra = {"usage": None} if include_usage else {}
    completion_tokens, offsets, started = 0, [0] * len(streams), [False] * len(streams)
    show_first = shape.echo_texts is not None or shape.prompt_logprobs or shape.return_token_ids
    try:
        if chat:  # OpenAI opens each choice with the assistant's role
            ids = {"prompt_token_ids": shape.prompts[0]} if shape.return_token_ids else {}
            yield sse({**head, **ids, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}
                                                  for i in range(len(streams))], **extra})
        async for i, out in iterate_async(streams):
            serving.metrics.observe(out)
            piece = Choice()
            piece.add(out, shape.score_only)
            completion_tokens += len(piece.token_ids)
            first = not started[i]
            if (not piece.text and not out.finished and not (first and show_first)
                    and not (shape.want_logprobs and piece.token_ids)):
                continue  # bytes of a character still incomplete, or held back for a stop string
            started[i] = True
            text, logprobs = piece.text, None
            if first and shape.echo_texts is not None:
                text, logprobs = echoed(serving, shape, i, piece)
            elif shape.want_logprobs:
                logprobs = (chat_logprobs(serving, piece.logprobs, shape) if chat
                            else completion_logprobs(serving, piece.logprobs, shape, offsets[i]))
            offsets[i] += len(text)
            choice = {"index": i, "logprobs": logprobs, "finish_reason": out.finish_reason}
            choice.update({"delta": {"content": text} if text or not out.finished else {}} if chat else {"text": text})
            choice.update(choice_extras(serving, shape, i, piece) if first else
                          {"token_ids": piece.token_ids} if shape.return_token_ids else {})
            yield sse({**head, "choices": [choice], **extra})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(shape.num_prompt_tokens, completion_tokens)})
    except ENGINE_ERRORS as error:
        yield sse(engine_error(error).body())
    yield sse("[DONE]")


def response_body(serving: Serving, choices: list[Choice], shape: ResponseShape) -> dict:
    """A whole (not streamed) chat or text completion response."""
    chat = shape.chat
    body = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": serving.model_name, "choices": [],
            "usage": usage(shape.num_prompt_tokens, sum(len(c.token_ids) for c in choices))}
    if chat and shape.return_token_ids:
        body["prompt_token_ids"] = shape.prompts[0]
    for i, c in enumerate(choices):
        choice = {"index": i, "finish_reason": c.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
            if shape.want_logprobs:
                choice["logprobs"] = chat_logprobs(serving, c.logprobs, shape)
        elif shape.echo_texts is not None:
            choice["text"], choice["logprobs"] = echoed(serving, shape, i, c)
        else:
            choice["text"] = c.text
            if shape.want_logprobs:
                choice["logprobs"] = completion_logprobs(serving, c.logprobs, shape)
        choice.update(choice_extras(serving, shape, i, c))
        body["choices"].append(choice)
    return body
