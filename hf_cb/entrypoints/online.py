"""The online engine: requests arrive at any time, from any thread or asyncio task, and each
one's new tokens and text come out of its `RequestStream` as steps finish.

One thread steps the model's `LLMEngine` (the same engine `generate_batch_continuous` steps
inline). Per step it does only what must be done there: append each sequence's new token ids to
its stream (`entrypoints.streams`) and wake the streams' consumers, once per asyncio loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import torch

from hf_cb.core.config import EngineConfig
from hf_cb.core.sequence import Sequence
from hf_cb.engine.on_model import get_engine
from hf_cb.entrypoints.streams import (  # noqa: F401 - the public names of online serving live here too
    AsyncNotifier,
    EngineDeadError,
    EngineStream,
    Notifier,
    RequestFailed,
    RequestOutput,
    RequestStream,
    iterate,
    iterate_async,
    new_stream,
    wake_all,
)
from hf_cb.performance.compile import frozen_heap
from hf_cb.sampling.params import SamplingParams, check_seed

logger = logging.getLogger("hf_cb")


class OnlineEngine:
    """Continuous batching for requests that arrive over time; a thread steps the model's engine.

    ``tokenizer`` (optional) gives each output its text and enables stop strings. The engine is
    the model's own (`hf_cb.get_engine`); while this object runs, only it steps that engine.
    """

    def __init__(self, model: torch.nn.Module, engine_config: EngineConfig | None = None, tokenizer: Any = None):
        self.engine = get_engine(model, engine_config)
        if self.engine.owner is not None:
            raise RuntimeError("another OnlineEngine already steps this model's engine")
        self.engine.owner = self
        self.tokenizer = tokenizer
        self.error: BaseException | None = None
        self._inbox: deque = deque()
        self._inbox_lock = threading.Lock()
        self._inbox_closed = False
        self._wake = threading.Event()
        self._streams: dict[int, EngineStream] = {}
        self._listeners: list[Callable[[], None]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="hf_cb-step-loop", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self.error is None and not self._inbox_closed and self._thread.is_alive()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def check_request(self, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise a ValueError naming the problem if the request can never run."""
        self.engine.limits.check(0, prompt_ids, params)

    # -- any thread ----------------------------------------------------------------------------

    def submit(self, prompt_ids: Seq[int], params: SamplingParams, seed: int | None = None, *,
               notifier: Notifier | AsyncNotifier | None = None, stop: Seq[str] = (),
               include_stop: bool = False, skip_special_tokens: bool = True) -> RequestStream:
        """Queue one sequence; raises ValueError at once if the request can never run.
        ``notifier``: share one between streams read together (`iterate` / `iterate_async`);
        default: a new one (an `AsyncNotifier` when called from a running event loop)."""
        if not self.is_alive:
            raise EngineDeadError(f"the hf_cb step loop has stopped: {self.error!r}")
        prompt_ids = list(prompt_ids)
        self.check_request(prompt_ids, params)
        if seed is not None:
            check_seed(seed)
        stream = new_stream(self, self.tokenizer, prompt_ids, params, seed, notifier, stop, include_stop,
                            skip_special_tokens)
        self.add_stream(stream)
        return stream

    def add_stream(self, stream: EngineStream) -> None:
        """Queue a stream built by the caller (`submit` builds local ones)."""
        self._post(("add", stream))

    def add_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs on the step thread after each step and before it idles."""
        self._listeners = [*self._listeners, listener]  # a new list: the step thread may be iterating

    def remove_listener(self, listener: Callable[[], None]) -> None:
        self._listeners = [x for x in self._listeners if x != listener]

    def abort(self, stream: RequestStream) -> None:
        self._post(("abort", stream))

    def shutdown(self) -> None:
        """Abort every request and stop the step thread (idempotent)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self.engine.owner is self:
            self.engine.owner = None

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting) sequences, for metrics."""
        scheduler = self.engine.scheduler
        return len(scheduler.running), len(scheduler.waiting) + len(self._inbox)

    def prefix_cache_stats(self) -> tuple[int, int]:
        """(prompt tokens looked up in the prefix cache, of them found there), since start."""
        return self.engine.prefix_cache_stats()

    def kv_cache_usage(self) -> float:
        manager = self.engine.manager
        return 0.0 if manager is None else 1.0 - manager.num_free_pages / manager.num_pages  # None: asleep

    def _post(self, item: tuple) -> None:
        with self._inbox_lock:  # closed by the step thread as it exits: nothing posted is lost
            if self._inbox_closed:
                if item[0] == "add":
                    raise EngineDeadError(f"the hf_cb step loop has stopped: {self.error!r}")
                return
            self._inbox.append(item)
        self._wake.set()

    # -- the step thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with frozen_heap():  # as a run of the offline engine, for the loop's whole life
                self._step_until_stopped()
        except BaseException as error:  # noqa: BLE001 - recorded: /health and new requests see it
            self.error = error
            logger.exception("hf_cb: the step loop died")
        finally:
            self._close()

    def _step_until_stopped(self) -> None:
        while not self._stopping:
            if self._inbox and not self.engine.has_unfinished():
                self.engine.sync_weights()  # weights updated while idle: no stale cached prefix
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._notify_listeners()
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                updated = self.engine.step()
            except Exception as error:  # noqa: BLE001 - the requests it touched fail, the loop goes on
                if _is_fatal(error):
                    raise
                self._fail_running(error)
                continue
            self._deliver(updated)
            self._notify_listeners()

    def _notify_listeners(self) -> None:
        for listener in self._listeners:
            listener()

    def _close(self) -> None:
        """Fail every request still queued or running; later submits raise `EngineDeadError`."""
        with self._inbox_lock:
            self._inbox_closed = True
            adds = [stream for kind, stream in self._inbox if kind == "add"]
            self._inbox.clear()
        streams = [*self._streams.values(), *adds]
        self._streams.clear()
        self.engine.abort_all()
        why = f"the hf_cb step loop died: {self.error!r}" if self.error else "the engine was shut down"
        for stream in streams:
            stream._fail(EngineDeadError(why))
        wake_all(streams)
        self._notify_listeners()

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, stream = self._inbox.popleft()
            if kind == "add":
                self._add(stream)
            elif stream.seq is not None and not stream.seq.is_finished:  # "abort"
                self.engine.finish(stream.seq, "abort")
                self._streams.pop(stream.seq.seq_id, None)
                stream._push(stream.seq, time.perf_counter())  # its last output: finish_reason "abort"
                wake_all([stream])

    def _add(self, stream: RequestStream) -> None:
        try:
            stream.seq = self.engine.add_request(stream.prompt_ids, stream.params, stream.seed)
        except ValueError as error:  # e.g. the engine changed since submit() checked
            stream._fail(error)
            wake_all([stream])
            return
        self._streams[stream.seq.seq_id] = stream

    def _deliver(self, updated: list[Sequence]) -> None:
        now, touched, streams = time.perf_counter(), [], self._streams
        for seq in updated:  # the hot path of serving: one pass, nothing per sequence beyond the feed
            stream = streams.get(seq.seq_id)
            if stream is None:  # aborted
                continue
            stream._push(seq, now)
            if stream.wakes:
                touched.append(stream)
            if seq.is_done:
                del streams[seq.seq_id]
        if touched:
            wake_all(touched)

    def _fail_running(self, error: Exception) -> None:
        """A step failed: the engine finds the request that caused it (`LLMEngine.recover`);
        only those fail, the others are computed again."""
        failed_seqs = self.engine.recover()
        logger.exception("hf_cb: a step failed; %s", f"failing {len(failed_seqs)} request(s)" if failed_seqs
                         else "running the requests it held one at a time to find the one that fails")
        failure = RequestFailed(f"the engine failed while running this request: {error!r}")
        failed = []
        for seq in failed_seqs:
            stream = self._streams.pop(seq.seq_id, None)
            if stream is not None:
                stream._fail(failure)
                failed.append(stream)
        wake_all(failed)


def _is_fatal(error: BaseException) -> bool:
    """Errors after which the device cannot run another step (a CUDA fault poisons the context)."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(error, accelerator_error) or "CUDA error" in str(error)
