"""The HTTP front end's process (``python -m hf_cb.server.frontend``, started by `HTTPServer`):
uvicorn serving the app over an `EngineClient`, which sends requests to the engine's process
and turns what comes back into local `RequestStream`s (detokenized here, off the engine's
process). The protocol is described in `hf_cb.server.http_server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from itertools import count
from multiprocessing.connection import Listener
from typing import Any

import uvicorn

from hf_cb.core.limits import RequestLimits
from hf_cb.entrypoints.streams import EngineDeadError, RequestFailed, RequestStream, new_stream, wake_all
from hf_cb.sampling.params import SamplingParams
from hf_cb.server.http_server import ADDRESS_ENV, KEY_ENV, FrontendSettings

_ERRORS = {"dead": EngineDeadError, "bad": ValueError, "failed": RequestFailed}
GRACE_S = 5  # after SIGTERM, for the connections to close once their streams have ended


class EngineClient:
    """The engine as the front end sees it: the `OnlineEngine` interface the routes use
    (`submit`, `abort`, `num_requests`, ...), over the connection ``conn``."""

    def __init__(self, conn, limits: RequestLimits, tokenizer: Any, on_engine_gone=lambda: None):
        self.conn, self.limits, self.tokenizer = conn, limits, tokenizer
        self.on_engine_gone = on_engine_gone
        self.error: BaseException | None = None
        self._stats: tuple = (0, 0, 0.0, 0, 0)  # see http_server's protocol
        self._streams: dict[int, RequestStream] = {}
        self._keys = count()
        self._lock = threading.Lock()
        threading.Thread(target=self._receive, name="hf_cb-client", daemon=True).start()

    @property
    def is_alive(self) -> bool:
        return self.error is None

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.limits.vocab_size

    def shut_down(self) -> None:
        """The server is stopping: fail every request in flight, and every new one."""
        self.error = EngineDeadError("the server is shutting down")
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream._fail(self.error)
        wake_all(streams)

    def check_request(self, prompt_ids, params: SamplingParams) -> None:
        self.limits.check(0, prompt_ids, params)

    def num_requests(self) -> tuple[int, int]:
        return self._stats[0], self._stats[1]

    def outstanding_tokens(self) -> int:
        """Tokens of the unfinished requests sent to this engine: prompts and what remains of
        their ``max_new_tokens`` (what the router balances)."""
        streams = list(self._streams.values())  # the receiver thread may be removing some
        return sum(len(s.prompt_ids) + s.params.max_new_tokens - s.num_generated for s in streams)

    def kv_cache_usage(self) -> float:
        return self._stats[2]

    def prefix_cache_stats(self) -> tuple[int, int]:
        return self._stats[3], self._stats[4]

    def submit(self, prompt_ids, params: SamplingParams, seed: int | None = None, *, notifier=None, stop=(),
               include_stop: bool = False, skip_special_tokens: bool = True) -> RequestStream:
        """As `OnlineEngine.submit`, for requests the routes have checked (`check_request`)."""
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        prompt_ids = list(prompt_ids)
        stream = new_stream(self, self.tokenizer, prompt_ids, params, seed, notifier, stop, include_stop,
                            skip_special_tokens)
        stream.key = next(self._keys)
        self._streams[stream.key] = stream
        self.send(("add", stream.key, prompt_ids, params, stream.seed))
        return stream

    def abort(self, stream: RequestStream) -> None:
        if self._streams.pop(stream.key, None) is not None:
            self.send(("abort", stream.key))

    def send(self, message: tuple) -> None:
        try:
            with self._lock:
                self.conn.send(message)
        except (OSError, ValueError) as error:
            raise EngineDeadError("the hf_cb engine's process has gone") from error

    def _receive(self) -> None:
        try:
            while True:
                self._apply(*self.conn.recv())
        except (EOFError, OSError):
            self.error = EngineDeadError("the hf_cb engine's process has gone")
            streams, self._streams = list(self._streams.values()), {}
            for stream in streams:
                stream._fail(self.error)
            wake_all(streams)
            self.on_engine_gone()

    def _apply(self, records: list, failures: list, dead: str | None, stats: tuple) -> None:
        now, touched = time.perf_counter(), []
        for key, tokens, logprobs, finish, prompt_logprobs in records:
            if (stream := self._streams.get(key)) is not None:
                stream._feed(tokens, logprobs, finish, now, prompt_logprobs)
                touched.append(stream)
                if finish is not None:
                    del self._streams[key]
        for key, kind, message in failures:
            if (stream := self._streams.pop(key, None)) is not None:
                stream._fail(_ERRORS[kind](message))
                touched.append(stream)
        if dead is not None:
            self.error = EngineDeadError(dead)
        self._stats = stats
        wake_all(touched)


class _Server(uvicorn.Server):
    """uvicorn, which on SIGTERM or SIGINT first ends every stream with an error event (then
    ``data: [DONE]``) and every waiting request with a 503, so that no client is cut off mid-answer;
    then it closes the connections (within `GRACE_S`) and exits."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], object]):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)


def serve(conn, settings: FrontendSettings, tokenizer: Any, listener: Listener | None = None) -> None:
    """uvicorn over an `EngineClient` until SIGTERM/SIGINT or the engine's process goes away;
    with a ``listener``, engines that `join` later share the requests (a `Router`), and the
    server stops when any of them goes away."""
    from hf_cb.server.app import create_app
    from hf_cb.server.router import Router

    server: uvicorn.Server | None = None

    def engine_gone() -> None:
        if server is not None:
            server.should_exit = True

    client = EngineClient(conn, settings.limits, tokenizer, on_engine_gone=engine_gone)
    router = Router(client)
    if listener is not None:
        threading.Thread(target=_accept_engines, args=(listener, router, settings, tokenizer, engine_gone),
                         name="hf_cb-join", daemon=True).start()
    app = create_app(router, tokenizer, model_name=settings.model_name, options=settings.options,
                     defaults=settings.defaults, eos_token_ids=settings.eos_token_ids)
    # uvicorn's access log is off: the app logs each request itself, with its request id.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, timeout_graceful_shutdown=GRACE_S)
    server = _Server(config, on_exit=lambda: [c.shut_down() for c in router.engines])
    # Out of the cyclic collector's walks: everything alive now (torch, Transformers, the app).
    # A full collection over them, set off by a request of 50,000 small prompts, held the GIL and
    # so the event loop for 0.2 s; the step loop freezes its heap for the same reason.
    gc.freeze()

    async def run() -> None:
        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            client.send(("ready", server.servers[0].sockets[0].getsockname()[1]))
        await task

    try:
        asyncio.run(run())
    except SystemExit:  # uvicorn could not bind
        pass
    if not server.started:
        with contextlib.suppress(EngineDeadError):
            client.send(("failed", f"could not bind {settings.host}:{settings.port} (see the log above)"))


def _accept_engines(listener: Listener, router, settings: FrontendSettings, tokenizer: Any, engine_gone) -> None:
    """Engines that `join` (data-parallel replicas), for as long as the front end runs."""
    while True:
        try:
            conn = listener.accept()
        except OSError:  # closed: the front end is ending
            return
        if conn.recv() == ("join",):
            router.add(EngineClient(conn, settings.limits, tokenizer, on_engine_gone=engine_gone))


def main() -> None:
    listener = Listener(os.environ[ADDRESS_ENV], family="AF_UNIX", authkey=bytes.fromhex(os.environ[KEY_ENV]))
    conn = listener.accept()
    settings, tokenizer = conn.recv()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        serve(conn, settings, tokenizer, listener)
    finally:
        listener.close()


if __name__ == "__main__":
    main()
