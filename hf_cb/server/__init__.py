"""hf_cb's OpenAI-compatible server: a thin FastAPI layer over `hf_cb.online.OnlineEngine`.

Needs the ``serve`` extra (``pip install 'hf_cb[serve]'``): FastAPI, uvicorn, prometheus_client.
"""

from .app import create_app
from .launch import ServerThread, run
from .serving import APIError, SamplingDefaults

__all__ = ["APIError", "SamplingDefaults", "ServerThread", "create_app", "run"]
