"""`HTTPServer`: the OpenAI-compatible API for an `OnlineEngine`, served by a process of its own.

Measured on an H200 (llama-1b, S1 all at once; docs/performance.md): with the step loop and the HTTP server
in one process, the server's text, SSE and metrics work (~30 us per streamed chunk, 256 chunks a
step) held the GIL that the step loop needs, and the server ran at 0.50 of offline throughput.
So, as vLLM does, the two run in two processes: the model, its engine and `generate` stay where
the user has them, and a child process (``python -m hf_cb.server.frontend``, a fresh
interpreter: nothing of the caller's ``__main__`` is re-run) serves HTTP. They talk over one
authenticated local socket (`multiprocessing.connection`):

- engine -> front end: first ``(FrontendSettings, tokenizer)``; then, after each step and before
  the step loop idles, ``(records, failures, dead, stats)``: each record ``(key, new token ids,
  new logprobs, finish reason, prompt logprobs)`` (the last only once, when asked for), each failure ``(key, kind, message)``, ``dead`` a message once
  the step loop has stopped, ``stats`` ``(running, waiting, kv usage, prefix-cache queries, hits)`` for ``/metrics``;
- front end -> engine: ``("add", key, prompt_ids, params, seed)``, ``("abort", key)``,
  ``("ready", port)`` or ``("failed", message)``.

Further engines (the replicas of ``hf-cb serve --data-parallel-size``) may `join` a started
front end at its `HTTPServer.engine_address`: each connects and sends ``("join",)``, then speaks
the same protocol; the front end routes each request to one of them (`server.router`).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Client
from typing import Any

from hf_cb.core.limits import RequestLimits
from hf_cb.entrypoints.online import OnlineEngine
from hf_cb.entrypoints.streams import EngineDeadError, EngineStream
from hf_cb.sampling.params import SamplingParams
from hf_cb.server.options import ServerOptions
from hf_cb.server.serving import SamplingDefaults, generation_defaults

logger = logging.getLogger("hf_cb")
ADDRESS_ENV, KEY_ENV = "HF_CB_FRONTEND_ADDRESS", "HF_CB_FRONTEND_KEY"


@dataclass(frozen=True)
class FrontendSettings:
    """What the front end's process is told at start."""

    model_name: str
    host: str
    port: int
    options: ServerOptions
    defaults: SamplingDefaults
    eos_token_ids: tuple[int, ...]
    limits: RequestLimits
    log_level: str


class _RemoteStream(EngineStream):
    """A sequence whose consumer is in the front end: its outputs go into the bridge's batch."""

    wakes = False  # the bridge sends each step's batch as the engine's listener

    def __init__(self, key: int, prompt_ids: list[int], params: SamplingParams, seed: int, bridge: "_EngineBridge"):
        super().__init__(prompt_ids, params, seed, bridge)
        self.key = key

    def _feed(self, tokens, logprobs, finish, now, prompt_logprobs=None) -> None:
        self.notifier.records.append((self.key, tokens, logprobs, finish, prompt_logprobs))
        if finish is not None:
            self.notifier.streams.pop(self.key, None)

    def _fail(self, error: BaseException) -> None:
        kind = "dead" if isinstance(error, EngineDeadError) else "bad" if isinstance(error, ValueError) else "failed"
        self.notifier.failures.append((self.key, kind, str(error)))
        self.notifier.streams.pop(self.key, None)


class _EngineBridge:
    """The engine's side of the socket: takes the front end's requests into the engine (a
    thread of its own), and sends what each step gave (a listener on the step thread)."""

    def __init__(self, online: OnlineEngine, conn):
        self.online, self.conn = online, conn
        self.lock = threading.Lock()  # one sender at a time
        self.records: list[tuple] = []
        self.failures: list[tuple] = []
        self.streams: dict[int, _RemoteStream] = {}
        self.reply: tuple | None = None  # the front end's ("ready", port) or ("failed", why)
        self.replied = threading.Event()
        self._dead_sent = False
        online.add_listener(self.flush)
        threading.Thread(target=self._receive, name="hf_cb-bridge", daemon=True).start()

    def notify(self) -> None:
        """The streams' notifier, for failures (`wake_all`); `flush` sends."""

    def flush(self) -> None:
        """Send the outputs gathered since the last flush, and the engine's state."""
        with self.lock:
            records, self.records = self.records, []
            failures, self.failures = self.failures, []
            dead = None
            if not self.online.is_alive and not self._dead_sent:
                dead, self._dead_sent = f"the hf_cb step loop has stopped: {self.online.error!r}", True
            stats = (*self.online.num_requests(), self.online.kv_cache_usage(), *self.online.prefix_cache_stats())
            try:
                self.conn.send((records, failures, dead, stats))
            except (OSError, ValueError):  # the front end has gone; `_receive` aborts its requests
                pass

    def _receive(self) -> None:
        streams = self.streams
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "add":
                    _, key, prompt_ids, params, seed = message
                    stream = streams[key] = _RemoteStream(key, prompt_ids, params, seed, self)
                    try:
                        self.online.add_stream(stream)
                    except EngineDeadError as error:
                        stream._fail(error)
                        self.flush()
                # pop: an aborted stream is never fed a finish, which is what pops the others
                elif message[0] == "abort" and (stream := streams.pop(message[1], None)) is not None:
                    self.online.abort(stream)
                elif message[0] in ("ready", "failed"):
                    self.reply = message
                    self.replied.set()
        except (EOFError, OSError):  # the front end has gone: nobody reads its requests
            for stream in list(streams.values()):
                self.online.abort(stream)
            self.replied.set()

    def close(self) -> None:
        self.online.remove_listener(self.flush)
        self.conn.close()


def join(online: OnlineEngine, address: str, key: bytes) -> _EngineBridge:
    """Serve ``online``'s engine, too, through the started front end at ``address`` (another
    replica's `HTTPServer.engine_address`); ``bridge.close()`` leaves."""
    conn = Client(address, family="AF_UNIX", authkey=key)
    conn.send(("join",))
    bridge = _EngineBridge(online, conn)
    bridge.flush()  # the engine's state before its first step
    return bridge


class HTTPServer:
    """The OpenAI-compatible API for ``online``, served by a child process on ``host:port``
    (port 0: any free port; see `url`), with ``options``' key and limits (``api_key``: the same
    as ``options=ServerOptions(api_key=...)``). ``defaults`` / ``eos_token_ids``: from the model's
    generation config unless given. A context manager, or `start` / `wait` / `stop`."""

    def __init__(self, online: OnlineEngine, tokenizer: Any, *, model_name: str, host: str = "127.0.0.1",
                 port: int = 8000, options: ServerOptions | None = None, api_key: str | None = None,
                 defaults: SamplingDefaults | None = None, eos_token_ids: tuple[int, ...] | None = None,
                 log_level: str = "info"):
        model_defaults, model_eos = generation_defaults(online.engine.model)
        self.online, self.tokenizer = online, tokenizer
        options = options or ServerOptions()
        if api_key is not None:
            options = replace(options, api_key=api_key)
        self.settings = FrontendSettings(model_name, host, port, options, defaults or model_defaults,
                                         model_eos if eos_token_ids is None else eos_token_ids,
                                         online.engine.limits, log_level)
        self.process: subprocess.Popen | None = None
        self.bridge: _EngineBridge | None = None
        self.port: int | None = None
        self.engine_address: tuple[str, bytes] | None = None  # (socket, key) where more engines `join`
        self._dir: str | None = None

    def start(self, timeout: float = 300.0) -> "HTTPServer":
        """Start the front end; returns once it listens (raises if it cannot)."""
        self._dir = tempfile.mkdtemp(prefix="hf_cb-")  # 0700: only this user reaches the socket
        address, key = os.path.join(self._dir, "engine.sock"), secrets.token_bytes(32)
        env = {**os.environ, ADDRESS_ENV: address, KEY_ENV: key.hex()}
        self.engine_address = address, key
        self.process = subprocess.Popen([sys.executable, "-m", "hf_cb.server.frontend"], env=env)
        try:
            conn = self._connect(address, key, time.monotonic() + timeout)
            conn.send((self.settings, self.tokenizer))
            self.bridge = _EngineBridge(self.online, conn)
            self.bridge.flush()  # the engine's state before its first step
            while not self.bridge.replied.wait(0.1):
                self._check_alive(time.monotonic() + timeout)
            reply = self.bridge.reply
            if reply is None or reply[0] != "ready":
                why = reply[1] if reply else "it exited"
                raise RuntimeError(f"the HTTP front end could not serve on {self.settings.host}:{self.settings.port}: {why}")
            self.port = reply[1]
        except BaseException:
            self.stop()
            raise
        return self

    def _connect(self, address: str, key: bytes, deadline: float):
        while True:
            try:
                return Client(address, family="AF_UNIX", authkey=key)
            except (FileNotFoundError, ConnectionRefusedError):
                self._check_alive(deadline)
                time.sleep(0.05)

    def _check_alive(self, deadline: float) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"the HTTP front end exited with status {self.process.returncode} before serving")
        if time.monotonic() > deadline:
            raise RuntimeError("the HTTP front end did not start in time")

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def wait(self) -> int:
        """Block until the front end's process ends (Ctrl-C ends it); its exit status."""
        return self.process.wait()

    def stop(self) -> None:
        """Stop the front end (its requests are aborted) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.bridge is not None:
            self.bridge.close()
            self.bridge = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "HTTPServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
