"""Run the app with uvicorn: blocking (the CLI) or from a thread (tests, benchmarks)."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI


def _config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    # One worker: the engine is in this process. No access log: a line per request costs
    # the event loop time that streaming needs.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted."""
    uvicorn.Server(_config(app, host, port, log_level)).run()


class ServerThread:
    """The app served from a background thread on ``host`` (port 0: any free port)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.server = uvicorn.Server(_config(app, host, port, log_level))
        self.thread = threading.Thread(target=self.server.run, name="hf_cb-http", daemon=True)
        self.host = host

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
