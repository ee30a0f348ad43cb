"""The streams of an online engine: what its step thread hands each sequence's new tokens to,
and what a consumer (a thread or an asyncio task) reads them from, with their text.

Detokenization and stop strings run on the consumer's side when it reads, so a consumer that
falls behind reads several tokens at once instead of slowing the step loop (vLLM's front end
works the same way).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from hf_cb.core.sequence import FinishReason, Sequence, TokenLogprob
from hf_cb.entrypoints.detokenizer import IncrementalDetokenizer
from hf_cb.sampling.params import SamplingParams, random_seed


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
    # With SamplingParams.prompt_logprobs, on the stream's first output: one entry per prompt token.
    prompt_logprobs: list[TokenLogprob | None] | None = None

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
        self._prompt_pushed = False

    def _push(self, seq: Sequence, now: float) -> None:
        end = seq.num_resolved
        start, self._pushed = self._pushed, end
        base = len(seq.prompt_ids)
        logprobs = seq.logprobs[start:end] if seq.logprobs is not None else None
        finish = seq.finish_reason if seq.is_done else None
        prompt_logprobs = None
        if seq.prompt_logprobs is not None and not self._prompt_pushed and (end > 0 or finish is not None):
            # Complete once the first token is: the prefill's last step scored the rest.
            prompt_logprobs, self._prompt_pushed = list(seq.prompt_logprobs), True
        self._feed(seq.token_ids[base + start : base + end], logprobs, finish, now, prompt_logprobs)

    def _feed(self, tokens: list[int], logprobs: list[TokenLogprob] | None, finish: FinishReason | None,
              now: float, prompt_logprobs: list[TokenLogprob | None] | None = None) -> None:
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
        self._prompt_logprobs: list[TokenLogprob | None] | None = None
        self._times: list[float] = []
        self._finish: FinishReason | None = None
        self._error: BaseException | None = None
        self._last_time: float | None = None
        self._closed = False

    # -- the producer's side (the step thread, or a front end's receiver) ----------------------

    def _feed(self, tokens, logprobs, finish, now, prompt_logprobs=None) -> None:
        with self._lock:
            self._tokens += tokens
            if logprobs is not None:
                self._logprobs += logprobs
            if prompt_logprobs is not None:
                self._prompt_logprobs = prompt_logprobs
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
            if not self._tokens and self._finish is None and self._error is None and self._prompt_logprobs is None:
                return None
            tokens, self._tokens = self._tokens, []
            prompt_logprobs, self._prompt_logprobs = self._prompt_logprobs, None
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
                            finish, len(self.prompt_ids), self.num_generated, prompt_logprobs=prompt_logprobs)
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
