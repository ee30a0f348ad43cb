"""vLLM's tokenizer routes at the server's root: ``POST /tokenize``, ``POST /detokenize`` and
``GET /tokenizer_info``, in vLLM's shapes (lm-eval's ``tokenizer_backend="remote"`` and TRL's
server client use them). Tokenizing runs off the event loop, as for the other routes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request

from hf_cb.server.errors import APIError
from hf_cb.server.protocol import DetokenizeRequest, TokenizeRequest
from hf_cb.server.serving import Serving


def add_tokenizer_routes(app: FastAPI, serving: Serving, parse: Callable[[Request, type], Awaitable[Any]]) -> None:
    """The three routes, on ``app``; ``parse``: the app's body parser (size limit, strict schema)."""

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        req = await parse(request, TokenizeRequest)
        serving.check_model(req.model)
        tokens = await asyncio.to_thread(_tokenize, serving, req)
        strs = [serving.token_text(t) for t in tokens] if req.return_token_strs else None
        return {"count": len(tokens), "max_model_len": serving.max_model_len, "tokens": tokens, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        req = await parse(request, DetokenizeRequest)
        serving.check_model(req.model)
        vocab = serving.online.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens has token id {bad[0]} outside the vocabulary (size {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(serving.tokenizer.decode, req.tokens)}

    @app.get("/tokenizer_info")
    async def info() -> dict:
        return tokenizer_info(serving.tokenizer)


def _tokenize(serving: Serving, req: TokenizeRequest) -> list[int]:
    if req.prompt is not None:
        return list(serving.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
    if getattr(serving.tokenizer, "chat_template", None) is None:
        raise APIError(400, "this model has no chat template", param="messages")
    messages = [{**(m.model_extra or {}), "role": m.role, "content": m.text()} for m in req.messages]
    try:
        return list(serving.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                                          tokenize=True, return_dict=False))
    except Exception as error:  # the template's own checks
        raise APIError(400, f"could not apply the chat template: {error}", param="messages") from error


def tokenizer_info(tokenizer: Any) -> dict:
    """vLLM's ``/tokenizer_info``: the tokenizer's class, its JSON-serialisable settings, its
    special tokens and chat template."""
    info = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if _is_json(v)}
    info.update({
        "tokenizer_class": type(tokenizer).__name__,
        "model_max_length": tokenizer.model_max_length if _is_json(tokenizer.model_max_length) else None,
        "chat_template": getattr(tokenizer, "chat_template", None),
    })
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = getattr(tokenizer, name, None)
        info[name] = str(token) if token is not None else None
    return info


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False
