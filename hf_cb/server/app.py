"""The OpenAI-compatible HTTP API (FastAPI) over an `OnlineEngine`.

Routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (and the un-prefixed
``/completions`` and ``/chat/completions`` of the system hf_cb grew from), ``/health``,
``/metrics``. Every error is OpenAI's body ``{"error": {message, type, param, code}}``: schema
errors are 400 (not FastAPI's 422), an unknown model 404, a missing or wrong API key 401, a
failure inside the engine 500, a dead step loop 503.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from hf_cb.entrypoints.streams import EngineDeadError, RequestStream
from hf_cb.server.protocol import ChatCompletionRequest, CompletionRequest
from hf_cb.server.serving import (
    ENGINE_ERRORS,
    APIError,
    SamplingDefaults,
    Serving,
    chat_logprobs,
    collect,
    completion_logprobs,
    engine_error,
    new_id,
    stream_events,
    usage,
)


class EventStream(StreamingResponse):
    """Server-sent events whose requests are aborted however the response ends (a client that
    disconnects cancels the stream; the finally frees the pages within a step)."""

    media_type = "text/event-stream"

    def __init__(self, content, streams: list[RequestStream]):
        super().__init__(content, headers={"Cache-Control": "no-cache"})
        self.streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self.streams:
                stream.abort()  # a no-op for finished ones


async def _until_disconnect(request: Request, work, streams: list[RequestStream]) -> Any:
    """Await ``work``, but abort the requests if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # a no-op once done
        for stream in streams:
            stream.abort()
    # cancel() only asks: the task is not done yet, and its result() would raise InvalidStateError
    if not task.done() or task.cancelled():
        return Response(status_code=499)  # nobody reads it: the client is gone
    return task.result()


def _is_type_tag(part: object) -> bool:
    """Pydantic names each member of a union by its type (``str``, ``list[int]``)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """OpenAI-style message and param for pydantic's first error. A field of several types
    (``prompt``) fails once per type: that is reported as one wrong type."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {'.'.join(loc)}", param
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    branches = [e for e in errors if len(e.get("loc", ())) > 2 and e["loc"][:2] == first["loc"][:2]
                and _is_type_tag(e["loc"][2])]
    if len(branches) > 1 and param is not None:
        kinds = " or ".join(dict.fromkeys(str(e["loc"][2]) for e in branches))
        return f"{param}: expected {kinds}, got {type(first.get('input')).__name__}", param
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{'.'.join(loc)}: {msg}" if loc else msg), param


def create_app(online: Any, tokenizer: Any, *, model_name: str, api_key: str | None = None,
               defaults: SamplingDefaults | None = None, eos_token_ids: tuple[int, ...] | None = None) -> FastAPI:
    """The app serving ``online`` (an `OnlineEngine`, or the front end's `EngineClient`) as
    ``model_name``. ``api_key``: required as a Bearer token on every ``/v1`` route and its
    aliases. ``defaults`` and ``eos_token_ids``: default, the model's generation config's (as
    vLLM's ``--generation-config auto``)."""
    serving = Serving.create(online, tokenizer, model_name, defaults=defaults, eos_token_ids=eos_token_ids)
    metrics = serving.metrics
    app = FastAPI(title="hf_cb", description="OpenAI-compatible server over hf_cb's continuous batching")
    app.state.serving = serving

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def schema_error(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error.errors())
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        body = APIError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None)
        return JSONResponse(body.body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {error!r}", type="server_error").body(), status_code=500)

    def authorized(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> Response:
        if online.is_alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "dead", "error": repr(online.error)}, status_code=503)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    api = APIRouter(dependencies=[Depends(authorized)])

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "hf_cb", "max_model_len": serving.max_model_len}]}

    async def run(request: Request, req, streams, num_prompt_tokens: int, chat: bool, want_logprobs: bool):
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(stream_events(serving, streams, chat=chat, want_logprobs=want_logprobs,
                                             include_usage=include_usage, num_prompt_tokens=num_prompt_tokens), streams)
        try:
            choices = await _until_disconnect(request, collect(serving, streams), streams)
        except ENGINE_ERRORS as error:
            raise engine_error(error) from error
        if isinstance(choices, Response):
            return choices
        body = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name, "choices": [],
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

    def submit(req, prompts, logprobs, prompt_param):
        params = serving.check(req, prompts, logprobs, prompt_param)
        try:
            return serving.submit(req, prompts, params)
        except EngineDeadError as error:
            raise engine_error(error) from error

    @api.post("/v1/completions")
    @api.post("/completions", include_in_schema=False)
    async def completions(req: CompletionRequest, request: Request):
        serving.check_model(req.model)
        prompts = serving.completion_prompts(req)
        streams = submit(req, prompts, req.logprobs, "prompt")
        return await run(request, req, streams, sum(map(len, prompts)), False, req.logprobs is not None)

    @api.post("/v1/chat/completions")
    @api.post("/chat/completions", include_in_schema=False)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        serving.check_model(req.model)
        prompt = serving.chat_prompt(req)
        streams = submit(req, [prompt], (req.top_logprobs or 0) if req.logprobs else None, "messages")
        return await run(request, req, streams, len(prompt), True, req.logprobs)

    app.include_router(api)
    return app
