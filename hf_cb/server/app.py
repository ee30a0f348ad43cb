"""The OpenAI-compatible HTTP API (FastAPI) over an `OnlineEngine`.

Routes: ``/v1/models`` (and ``/v1/models/{id}``), ``/v1/completions``, ``/v1/chat/completions``
(and the un-prefixed ``/completions`` and ``/chat/completions`` of the system hf_cb grew from),
vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` (`tokenize`), ``/health``,
``/metrics``. Every error is OpenAI's body ``{"error": {message, type, param,
code}}``: a bad request is 400 (schema errors too, not FastAPI's 422), an unknown model 404, a
missing or wrong API key 401, a body over the limit 413, a failure inside the engine 500, a dead
step loop 503.

The event loop serves every stream, so nothing slow runs on it: request bodies are parsed and
validated, and prompts tokenized and templated, in worker threads.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from hf_cb.entrypoints.streams import EngineDeadError, RequestStream
from hf_cb.server.errors import ENGINE_ERRORS, APIError, engine_error
from hf_cb.server.middleware import AccessLog, LimitBody, RequireKey, read_body
from hf_cb.server.options import ServerOptions
from hf_cb.server.protocol import ChatCompletionRequest, CompletionRequest, parse_json, prompt_count, validate
from hf_cb.server.responses import ResponseShape, collect, response_body, stream_events
from hf_cb.server.serving import SamplingDefaults, Serving
from hf_cb.server.tokenize import add_tokenizer_routes


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


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        body = APIError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None)
        return JSONResponse(body.body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {error!r}", type="server_error").body(), status_code=500)


def create_app(online: Any, tokenizer: Any, *, model_name: str, options: ServerOptions | None = None,
               defaults: SamplingDefaults | None = None, eos_token_ids: tuple[int, ...] | None = None) -> FastAPI:
    """The app serving ``online`` (an `OnlineEngine`, or the front end's `EngineClient`) as
    ``model_name``, with ``options``' key, limits and docs. ``defaults`` and ``eos_token_ids``:
    default, the model's generation config's (as vLLM's ``--generation-config auto``)."""
    options = options or ServerOptions()
    serving = Serving.create(online, tokenizer, model_name, defaults=defaults, eos_token_ids=eos_token_ids,
                             max_prompts=options.max_prompts)
    docs = options.enable_docs
    app = FastAPI(title="hf_cb", description="OpenAI-compatible server over hf_cb's continuous batching",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.serving = serving
    # Outermost last: the access log sees every answer, the key is checked before the size.
    app.add_middleware(LimitBody, max_bytes=options.max_request_bytes)
    app.add_middleware(RequireKey, api_key=options.api_key, protected=options.protects)
    app.add_middleware(AccessLog, enabled=options.log_requests)
    _error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if online.is_alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "dead", "error": repr(online.error)}, status_code=503)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "hf_cb",
                "max_model_len": serving.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        serving.check_model(model_id)
        return model_card()

    def checked(body: bytes, cls: type):
        data = parse_json(body)
        if cls is CompletionRequest:
            serving.check_count(prompt_count(data))
        return validate(data, cls)

    async def parse(request: Request, cls: type):
        body = await read_body(request.stream(), options.max_request_bytes)
        return await asyncio.to_thread(checked, body, cls)

    async def run(request: Request, req, prompts: list[list[int]], logprobs: int | None, chat: bool,
                  echo_texts: list[str] | None = None):
        params = serving.check(req, prompts, logprobs, "messages" if chat else "prompt")
        try:
            streams = serving.submit(req, prompts, params)
        except EngineDeadError as error:
            raise engine_error(error) from error
        shape = ResponseShape.of(req, prompts, logprobs, echo_texts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(stream_events(serving, streams, shape, include_usage=include_usage), streams)
        try:
            choices = await _until_disconnect(request, collect(serving, streams, shape), streams)
        except ENGINE_ERRORS as error:
            raise engine_error(error) from error
        if isinstance(choices, Response):
            return choices
        return response_body(serving, choices, shape)

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    @app.post("/completions", include_in_schema=False)
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        serving.check_model(req.model)
        prompts = await asyncio.to_thread(serving.completion_prompts, req)
        echo_texts = await asyncio.to_thread(serving.echo_texts, req, prompts) if req.echo else None
        return await run(request, req, prompts, req.logprobs, chat=False, echo_texts=echo_texts)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    @app.post("/chat/completions", include_in_schema=False)
    async def chat_completions(request: Request):
        req = await parse(request, ChatCompletionRequest)
        serving.check_model(req.model)
        prompt = await asyncio.to_thread(serving.chat_prompt, req)
        return await run(request, req, [prompt], (req.top_logprobs or 0) if req.logprobs else None, chat=True)

    add_tokenizer_routes(app, serving, parse)

    return app


def _body_schema(cls: type) -> dict:
    """The OpenAPI description of a body the route parses itself (off the event loop)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": cls.model_json_schema()}}}}
