"""``hf-cb generate``: every line of a JSONL file answered, in input order.

A line is the body of an OpenAI request (``{"prompt": ...}`` or ``{"messages": [...]}`` with
any request field: ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``n``, ``stop``, ...) and
means what it means to the server. Every line is checked before anything is generated.
"""

from __future__ import annotations

import asyncio
import json
import time
from argparse import Namespace
from typing import Any

from pydantic import ValidationError
from tqdm.auto import tqdm

from hf_cb.entrypoints.online import OnlineEngine
from hf_cb.server.app import _validation_message
from hf_cb.server.protocol import ChatCompletionRequest, CompletionRequest
from hf_cb.server.serving import APIError, Serving, chat_logprobs, collect, completion_logprobs


class BadLine(ValueError):
    """A line of the input that cannot run; the message names it."""


def _parse(serving: Serving, number: int, line: str, defaults: dict[str, Any]):
    """(request, prompts, params) of one line; `BadLine` naming the line and the problem."""
    try:
        body = json.loads(line)
        if not isinstance(body, dict):
            raise BadLine(f"line {number}: expected a JSON object, got {type(body).__name__}")
        body = {**defaults, **body}
        chat = "messages" in body
        req = ChatCompletionRequest(**body) if chat else CompletionRequest(**body)
        prompts = [serving.chat_prompt(req)] if chat else serving.completion_prompts(req)
        logprobs = ((req.top_logprobs or 0) if req.logprobs else None) if chat else req.logprobs
        return req, prompts, serving.check(req, prompts, logprobs, "messages" if chat else "prompt")
    except json.JSONDecodeError as error:
        raise BadLine(f"line {number}: not JSON ({error})") from error
    except ValidationError as error:
        raise BadLine(f"line {number}: {_validation_message(error.errors())[0]}") from error
    except APIError as error:
        raise BadLine(f"line {number}: {error.message}") from error


def _result(serving: Serving, req, prompts: list[list[int]], choices) -> dict:
    chat = isinstance(req, ChatCompletionRequest)
    want = req.logprobs if chat else req.logprobs is not None

    def one(c) -> dict:
        out = {"text": c.text, "finish_reason": c.finish_reason, "completion_tokens": len(c.token_ids)}
        if want:
            out["logprobs"] = chat_logprobs(serving, c.logprobs) if chat else completion_logprobs(serving, c.logprobs)
        return out

    result = {**one(choices[0]), "prompt_tokens": sum(map(len, prompts)),
              "completion_tokens": sum(len(c.token_ids) for c in choices)}
    if len(choices) > 1:
        result["choices"] = [one(c) for c in choices]
    return result


async def generate_file(online: OnlineEngine, loaded: Any, lines: list[str], args: Namespace) -> list[dict]:
    """One result per non-blank line: ``text``, ``finish_reason``, ``prompt_tokens``,
    ``completion_tokens`` (all choices), and ``choices`` when ``n`` > 1."""
    serving = Serving.create(online, loaded.tokenizer, loaded.name)
    flags = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "seed": args.seed, "n": args.n, "stop": args.stop}
    defaults = {k: v for k, v in flags.items() if v is not None}
    jobs = [_parse(serving, i + 1, line, defaults) for i, line in enumerate(lines) if line.strip()]
    bar = tqdm(total=len(jobs), disable=args.no_progress, unit="line", desc="hf-cb generate")
    start, generated = time.perf_counter(), 0

    async def run(req, prompts, params):
        nonlocal generated
        choices = await collect(serving, serving.submit(req, prompts, params))
        generated += sum(len(c.token_ids) for c in choices)
        bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.0f}", refresh=False)
        bar.update(1)
        return _result(serving, req, prompts, choices)

    try:
        return await asyncio.gather(*(run(*job) for job in jobs))
    finally:
        bar.close()
