"""hf_cb's OpenAI-compatible server: a thin FastAPI layer over `hf_cb.OnlineEngine`,
served by a process of its own (`HTTPServer`) while the engine stays with the model.

Needs the ``serve`` extra (``pip install 'hf_cb[serve]'``): FastAPI, uvicorn, prometheus_client.
The names below load on first use, so that `hf_cb.server.options` (what the CLI reads before it
loads anything) needs none of them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "HTTPServer", "SamplingDefaults", "ServerOptions", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "HTTPServer":
        from hf_cb.server.http_server import HTTPServer

        return HTTPServer
    if name == "create_app":
        from hf_cb.server.app import create_app

        return create_app
    if name == "APIError":
        from hf_cb.server.errors import APIError

        return APIError
    if name == "SamplingDefaults":
        from hf_cb.server.serving import SamplingDefaults

        return SamplingDefaults
    if name == "ServerOptions":
        from hf_cb.server.options import ServerOptions

        return ServerOptions
    raise AttributeError(f"module 'hf_cb.server' has no attribute {name!r}")
