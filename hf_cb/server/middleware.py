"""What every HTTP request passes before a route sees it (plain ASGI, so nothing is buffered):
an access-log line with a request id, the API key, and the limit on the body's size.

Each answers with OpenAI's error body before the body is read: a request without the key gets
its 401 however large or malformed its body, and one whose ``Content-Length`` is over the limit
its 413.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from hf_cb.server.errors import APIError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_logger = logging.getLogger("hf_cb.access")


async def send_error(send: Send, error: APIError, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class AccessLog:
    """One INFO line per request once its response is sent: client, method, path, status,
    latency and request id (the client's ``X-Request-Id``, else a new one, returned in the
    response's header either way)."""

    def __init__(self, app: ASGIApp, enabled: bool = True):
        self.app, self.enabled = app, enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = (_header(scope, b"x-request-id") or uuid.uuid4().hex)[:64]
        start, status = time.perf_counter(), [0]

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.enabled:
                client = scope.get("client") or ("-", 0)
                access_logger.info('%s:%s "%s %s" %d %.1f ms request_id=%s', client[0], client[1], scope["method"],
                                   scope["path"], status[0], (time.perf_counter() - start) * 1e3, request_id)


class RequireKey:
    """``Authorization: Bearer KEY`` (the scheme in any case, RFC 7235) on the paths that
    ``protected`` accepts, compared in constant time, before the body is read."""

    def __init__(self, app: ASGIApp, api_key: str | None, protected: Callable[[str], bool]):
        self.app, self.protected = app, protected
        self.key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is not None and scope["type"] == "http" and self.protected(scope["path"]):
            scheme, _, token = (_header(scope, b"authorization") or "").strip().partition(" ")
            if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)):
                error = APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                                 code="invalid_api_key", type="authentication_error")
                return await send_error(send, error, [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


def body_too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {max_bytes} bytes "
                    "(--max-request-bytes)", code="request_too_large")


class LimitBody:
    """A 413 at once for a body whose ``Content-Length`` is over ``max_bytes``, before anything
    of it is read. (A chunked body without a length is counted as it is read: `read_body`.)"""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = _header(scope, b"content-length") if scope["type"] == "http" else None
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, body_too_large(self.max_bytes), [(b"connection", b"close")])
        await self.app(scope, receive, send)


async def read_body(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """A request's body from its ``chunks``; a 413 `APIError` once it passes ``max_bytes``."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise body_too_large(max_bytes)
    return bytes(body)
