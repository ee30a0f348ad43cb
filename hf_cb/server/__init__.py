"""hf_cb's OpenAI-compatible server: a thin FastAPI layer over `hf_cb.OnlineEngine`,
served by a process of its own (`HTTPServer`) while the engine stays with the model.

Needs the ``serve`` extra (``pip install 'hf_cb[serve]'``): FastAPI, uvicorn, prometheus_client.
"""

from hf_cb.server.app import create_app
from hf_cb.server.http_server import HTTPServer
from hf_cb.server.serving import APIError, SamplingDefaults

__all__ = ["APIError", "HTTPServer", "SamplingDefaults", "create_app"]
