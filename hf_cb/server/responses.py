"""Engine outputs in, OpenAI responses out: whole responses, server-sent events, log-probabilities."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hf_cb.core.sequence import TokenLogprob
from hf_cb.entrypoints.streams import RequestOutput, RequestStream, iterate_async
from hf_cb.server.errors import ENGINE_ERRORS, engine_error
from hf_cb.server.serving import Serving


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


def response_body(serving: Serving, choices: list[Choice], *, chat: bool, want_logprobs: bool,
                  num_prompt_tokens: int) -> dict:
    """A whole (not streamed) chat or text completion response."""
    body = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": serving.model_name, "choices": [],
            "usage": usage(num_prompt_tokens, sum(len(c.token_ids) for c in choices))}
    for i, c in enumerate(choices):
        choice = {"index": i, "finish_reason": c.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
            if want_logprobs:
                choice["logprobs"] = chat_logprobs(serving, c.logprobs)
        else:
            choice["text"] = c.text
            if want_logprobs:
                choice["logprobs"] = completion_logprobs(serving, c.logprobs)
        body["choices"].append(choice)
    return body
