"""The online engine: requests arrive at any time, from any thread or asyncio task, and each
one's new tokens and text come out of its `RequestStream` as steps finish.

One thread steps the model's `LLMEngine` (the same engine `generate_batch_continuous` steps
inline). Per step it does only what must be done there: append each sequence's new token ids to
its stream and wake the streams' consumers, once per asyncio loop. Detokenization and stop
strings run on the consumer's side when it reads, so a consumer that falls behind reads several
tokens at once instead of slowing the step loop (vLLM's front end works the same way).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .engine import frozen_heap
from .model_engine import get_engine
from .sampling import SamplingParams, random_seed
from .sequence import FinishReason, Sequence, TokenLogprob

logger = logging.getLogger("hf_cb")


class EngineDeadError(RuntimeError):
    """The step loop has stopped; no request can run until the engine is rebuilt."""


class RequestFailed(RuntimeError):
    """The engine failed while running this request; the message says why."""


@dataclass
class RequestOutput:
    """What a stream yields: the tokens and text new since the last output.

    ``time_to_first_token`` is set on the output carrying the first token; ``inter_token_latencies``
    are the gaps between the steps whose tokens this output carries (for metrics).
    """

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_generated: int
    time_to_first_token: float | None = None
    inter_token_latencies: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Notifier:
    """Wakes a thread that waits on one or more streams."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def notify(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)


class AsyncNotifier:
    """Wakes an asyncio task; the step thread wakes all of one loop's tasks with one call."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def clear(self) -> None:
        self.event.clear()

    async def wait(self) -> None:
        await self.event.wait()


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


class EngineStream:
    """What the step thread hands one sequence's new tokens to (`_push`); subclasses say where
    they go (`_feed`): a local `RequestStream`, or a pipe to another process. ``wakes``: whether
    the step thread must wake a consumer after feeding it (a remote stream's batch is sent once
    per step by a listener instead)."""

    wakes = True

    def __init__(self, prompt_ids: list[int], params: SamplingParams, seed: int, notifier: Any):
        self.prompt_ids, self.params, self.seed, self.notifier = prompt_ids, params, seed, notifier
        self.seq: Sequence | None = None  # set by the step thread when the engine takes it
        self._pushed = 0  # tokens of seq handed over so far (step thread only)

    def _push(self, seq: Sequence, now: float) -> None:
        end = seq.num_resolved
        start, self._pushed = self._pushed, end
        base = len(seq.prompt_ids)
        logprobs = seq.logprobs[start:end] if seq.logprobs is not None else None
        self._feed(seq.token_ids[base + start : base + end], logprobs, seq.finish_reason if seq.is_done else None, now)

    def _feed(self, tokens: list[int], logprobs: list[TokenLogprob] | None, finish: FinishReason | None,
              now: float) -> None:
        raise NotImplementedError

    def _fail(self, error: BaseException) -> None:
        raise NotImplementedError


class RequestStream(EngineStream):
    """One generated sequence of an `OnlineEngine`. Iterate it (``for`` or ``async for``) for its
    `RequestOutput`s, or poll `take`; `abort` cancels it and frees its pages within a step."""

    def __init__(self, engine: Any, prompt_ids: list[int], params: SamplingParams, seed: int,
                 notifier: Notifier | AsyncNotifier, detokenizer: IncrementalDetokenizer | None):
        super().__init__(prompt_ids, params, seed, notifier)
        self.engine, self.detokenizer = engine, detokenizer  # engine: what `abort` tells
        self.arrival_time = time.perf_counter()
        self.num_generated = 0
        self._lock = threading.Lock()
        self._tokens: list[int] = []
        self._logprobs: list[TokenLogprob] = []
        self._times: list[float] = []
        self._finish: FinishReason | None = None
        self._error: BaseException | None = None
        self._last_time: float | None = None
        self._closed = False

    # -- the producer's side (the step thread, or a front end's receiver) ----------------------

    def _feed(self, tokens, logprobs, finish, now) -> None:
        with self._lock:
            self._tokens += tokens
            if logprobs is not None:
                self._logprobs += logprobs
            if tokens:
                self._times.append(now)
            if finish is not None:
                self._finish = finish

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            self._error = error

    # -- the consumer's side -------------------------------------------------------------------

    def take(self) -> RequestOutput | None:
        """The output new since the last call, or None if nothing is new. Raises
        `RequestFailed` / `EngineDeadError` if the engine failed the request."""
        if self._closed:
            return None
        with self._lock:
            if not self._tokens and self._finish is None and self._error is None:
                return None
            tokens, self._tokens = self._tokens, []
            logprobs, self._logprobs = self._logprobs, []
            times, self._times = self._times, []
            finish, error = self._finish, self._error
        if error is not None:
            self._closed = True
            raise error
        text = ""
        if self.detokenizer is not None:
            if self.detokenizer.add(tokens):  # a stop string: keep the tokens up to it
                tokens = tokens[: self.detokenizer.num_tokens - self.num_generated]
                finish = "stop"
                self.engine.abort(self)
            text = self.detokenizer.delta(final=finish is not None)
        self.num_generated += len(tokens)
        self._closed = finish is not None
        out = RequestOutput(tokens, text, logprobs[: len(tokens)] if self.params.logprobs is not None else None,
                            finish, len(self.prompt_ids), self.num_generated)
        for t in times:
            if self._last_time is None:
                out.time_to_first_token = t - self.arrival_time
            else:
                out.inter_token_latencies.append(t - self._last_time)
            self._last_time = t
        return out

    def abort(self) -> None:
        """Cancel the request; its pages are freed by the step thread within a step."""
        self.engine.abort(self)

    def __iter__(self) -> Iterator[RequestOutput]:
        for _, out in iterate([self]):
            yield out

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        async for _, out in iterate_async([self]):
            yield out


def iterate(streams: Seq[RequestStream]) -> Iterator[tuple[int, RequestOutput]]:
    """``(index, output)`` of streams that share one `Notifier`, as they come, until all finish."""
    notifier, active = streams[0].notifier, list(range(len(streams)))
    while active:
        notifier.clear()  # before reading: a push after this wakes the wait below
        outs = _take_all(streams, active)
        yield from outs
        if not outs:
            notifier.wait()


async def iterate_async(streams: Seq[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """``(index, output)`` of streams that share one `AsyncNotifier`, as they come."""
    notifier, active = streams[0].notifier, list(range(len(streams)))
    while active:
        notifier.clear()
        outs = _take_all(streams, active)
        for item in outs:
            yield item
        if not outs:
            await notifier.wait()


def _take_all(streams: Seq[RequestStream], active: list[int]) -> list[tuple[int, RequestOutput]]:
    outs = [(i, out) for i in active if (out := streams[i].take()) is not None]
    for i, out in outs:
        if out.finished:
            active.remove(i)
    return outs


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

    def kv_cache_usage(self) -> float:
        manager = self.engine.manager
        return 1.0 - manager.num_free_pages / manager.num_pages

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
        logger.exception("hf_cb: a step failed; failing the requests it touched")
        failure = RequestFailed(f"the engine failed while running this request: {error!r}")
        # A step that failed before any request ran (admitting them) would fail again: fail all.
        failed = []
        for seq in self.engine.abort_running() or self.engine.abort_all():
            stream = self._streams.pop(seq.seq_id, None)
            if stream is not None:
                stream._fail(failure)
                failed.append(stream)
        wake_all(failed)


def wake_all(streams: Seq[EngineStream]) -> None:
    """Wake the streams' consumers: one call per asyncio loop and one per other notifier, not
    one per stream."""
    by_loop: dict[Any, list[asyncio.Event]] = defaultdict(list)
    others: dict[int, Any] = {}
    for stream in streams:
        n = stream.notifier
        if isinstance(n, AsyncNotifier):
            by_loop[n.loop].append(n.event)
        else:
            others[id(n)] = n
    for n in others.values():
        n.notify()
    for loop, events in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, events)
        except RuntimeError:  # the consumer's loop is closed: nobody is waiting
            pass


def new_stream(engine: Any, tokenizer: Any, prompt_ids: list[int], params: SamplingParams, seed: int | None,
               notifier: Notifier | AsyncNotifier | None, stop: Seq[str], include_stop: bool,
               skip_special_tokens: bool) -> RequestStream:
    """A local stream, detokenized with ``tokenizer`` (None: token ids only)."""
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    detok = None
    if tokenizer is not None:
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens, stop=stop,
                                       include_stop=include_stop, min_tokens=params.min_new_tokens)
    return RequestStream(engine, prompt_ids, params, random_seed() if seed is None else seed,
                         notifier or _default_notifier(), detok)


def _default_notifier() -> Notifier | AsyncNotifier:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return Notifier()
    return AsyncNotifier()


def _is_fatal(error: BaseException) -> bool:
    """Errors after which the device cannot run another step (a CUDA fault poisons the context)."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(error, accelerator_error) or "CUDA error" in str(error)
