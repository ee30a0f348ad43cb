"""hf_cb's OpenAI-compatible server: a thin FastAPI layer over `hf_cb.online.OnlineEngine`,
served by a process of its own (`HTTPServer`) while the engine stays with the model.

Needs the ``serve`` extra (``pip install 'hf_cb[serve]'``): FastAPI, uvicorn, prometheus_client.
"""

from .app import create_app
from .http_server import HTTPServer
from .serving import APIError, SamplingDefaults

__all__ = ["APIError", "HTTPServer", "SamplingDefaults", "create_app"]
