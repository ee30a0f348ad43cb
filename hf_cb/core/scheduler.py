"""Iteration-level scheduling: which sequences run in the next step, and how many tokens each.

Running sequences go first, in admission order: a decode row costs one token, an unfinished
prompt costs its next chunk. Waiting sequences are admitted while the step has token budget,
sequence slots and pages. When pages run out, the most recently admitted sequences are
preempted: their pages are freed and they are recomputed later from their tokens so far.

With prefix caching, an admitted sequence starts from the cached pages of its longest cached
prefix (always leaving at least one token to compute, whose logits it needs), and its full
pages are cached once computed. A waiting sequence whose next page a running sequence is about
to compute waits a step and takes it from the cache: the ``n`` samples of a prompt, or requests
sharing a system prompt that arrive together, prefill it once.

After a step fails, the engine puts back every sequence it touched (`requeue`) and names the ones
that have not yet run a step alone as suspects (`isolate`): until each suspect has sampled a token
in a step of its own, steps run one suspect alone. A failure then names its cause.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

from hf_cb.core.config import EngineConfig
from hf_cb.core.prefix_cache import page_hashes
from hf_cb.core.sequence import Sequence, SequenceStatus, TokenLogprob
from hf_cb.core.stats import StepStats
from hf_cb.manager import PageManager


@dataclass
class ScheduledBatch:
    """The rows of one step: row ``i`` feeds ``num_new_tokens[i]`` tokens of ``seqs[i]``."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    pending_index: list[int] = field(default_factory=list)  # where each sampled token went
    forks: list = field(default_factory=list)  # state copies to make first (`state_scheduler.Fork`)

    @cached_property
    def is_decode(self) -> bool:
        """Every row feeds exactly its last token."""
        return all(
            n == 1 and s.num_cached_tokens == s.num_tokens - 1
            for s, n in zip(self.seqs, self.num_new_tokens)
        )

    @cached_property
    def sample_rows(self) -> list[int]:
        """Rows that reach the end of their tokens, so their logits pick a new token. (Read
        before the step is launched: launching advances the sequences.)"""
        return [
            row for row, (s, n) in enumerate(zip(self.seqs, self.num_new_tokens))
            if s.num_cached_tokens + n == s.num_tokens
        ]


def decode_rows_first(batch: ScheduledBatch) -> ScheduledBatch:
    """The batch with its single-token rows first (stable), so the attention backend can run
    them as one block on its decode kernel."""
    order = sorted(range(len(batch.seqs)), key=lambda r: batch.num_new_tokens[r] != 1)
    return ScheduledBatch([batch.seqs[r] for r in order], [batch.num_new_tokens[r] for r in order])


class Scheduler:
    def __init__(self, config: EngineConfig, manager: PageManager, stats: StepStats | None = None):
        """``stats``: where ``prefix_queries`` and ``prefix_hits`` are counted (the engine's)."""
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.manager = manager
        self.page_size = manager.page_size
        self.caching = manager.prefix_cache is not None
        self.stats = stats
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.suspects: deque[Sequence] = deque()  # run alone, one by one, after a failed step
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        if self.suspects:
            return self._schedule_alone(self.suspects[0])
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        preemptions_before = self.num_preemptions
        for seq in list(self.running):
            # A sequence preempted to make room for an older row takes every newer one with it.
            if budget == 0 or seq.status is not SequenceStatus.RUNNING:
                break
            n = min(seq.num_tokens - seq.num_cached_tokens, budget)
            if not self._make_room(seq, seq.num_cached_tokens + n):
                break
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        # Admitting new work right after a preemption would only evict it again.
        if self.num_preemptions == preemptions_before:
            self._admit(batch, budget)
        return decode_rows_first(batch)

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        i, promised = 0, None
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            prefix, matchable = self._cached_prefix(seq)
            if len(prefix) < matchable:  # does a running sequence compute the next page now?
                promised = self._promised_pages() if promised is None else promised
                if seq.block_hashes[len(prefix)] in promised:
                    i += 1  # next step it is cached
                    continue
            num_cached = len(prefix) * self.page_size
            n = min(seq.num_tokens - num_cached, budget)
            if not self.manager.can_allocate(seq.seq_id, num_cached + n, prefix):
                break
            self.manager.allocate(seq.seq_id, num_cached + n, prefix)
            self._start_at(seq, num_cached, len(prefix))
            if promised is not None:
                promised.update(seq.block_hashes[len(prefix) :])
            del self.waiting[i]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

    def _schedule_alone(self, seq: Sequence) -> ScheduledBatch:
        """A step of ``seq`` and nothing else: its next chunk, preempting other running sequences
        for its pages and its slot (they keep theirs otherwise, and wait)."""
        batch = ScheduledBatch([], [])
        if seq.status is SequenceStatus.WAITING:
            prefix, _ = self._cached_prefix(seq)
            num_cached = len(prefix) * self.page_size
            n = min(seq.num_tokens - num_cached, self.max_num_batched_tokens)
            while self.running and not (len(self.running) < self.max_num_seqs
                                        and self.manager.can_allocate(seq.seq_id, num_cached + n, prefix)):
                self._preempt(self.running[-1])
            if not self.manager.can_allocate(seq.seq_id, num_cached + n, prefix):
                return batch  # the pool cannot hold it even alone; the engine says so
            self.manager.allocate(seq.seq_id, num_cached + n, prefix)
            self._start_at(seq, num_cached, len(prefix))
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        else:
            n = min(seq.num_tokens - seq.num_cached_tokens, self.max_num_batched_tokens)
            if not self._make_room(seq, seq.num_cached_tokens + n, spare=seq):
                return batch
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        return batch

    def isolate(self, seqs: list[Sequence]) -> None:
        """Run each of ``seqs`` alone, in order, until it has sampled a token."""
        self.suspects.extend(seqs)

    def requeue(self, seqs: list[Sequence]) -> None:
        """Put sequences a failed step may have touched back to be computed again from their
        resolved tokens: their pages are freed, tokens still pending dropped (the same ones are
        drawn again: sampling is a function of the seed and the position), and a sequence that
        had finished on its pending token is unfinished. They wait at the front, in order."""
        for seq in reversed(seqs):
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
                self.manager.free(seq.seq_id)
            elif seq.status is SequenceStatus.WAITING:
                self.waiting.remove(seq)
            seq.truncate(seq.num_resolved)
            seq.finish_reason = None
            seq.num_cached_tokens = seq.num_registered_pages = 0
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], int]:
        """(the cached pages a waiting sequence starts from, how many pages could have been)."""
        if not self.caching or seq.params.prompt_logprobs is not None:  # its prompt is scored: computed
            return [], 0
        # Resolved tokens only, and never the last token: its logits are needed.
        matchable = min(seq.num_tokens - 1, seq.num_tokens - seq.num_pending) // self.page_size
        page_hashes(seq.token_ids, self.page_size, seq.block_hashes, matchable)
        return self.manager.match(seq.block_hashes[:matchable]), matchable

    def _promised_pages(self) -> set[bytes]:
        """Hashes of prompt pages that running sequences have yet to compute or cache."""
        return {h for s in self.running if s.num_cached_tokens < len(s.prompt_ids)
                for h in s.block_hashes[s.num_registered_pages :]}

    def _start_at(self, seq: Sequence, num_cached: int, num_pages: int) -> None:
        """An admitted sequence starts with its first ``num_cached`` tokens (``num_pages``
        pages, found in the prefix cache) computed; count the hits."""
        seq.num_cached_tokens = num_cached
        seq.num_registered_pages = num_pages  # the cached pages are registered already
        if seq.num_prefix_hit_tokens is None:
            seq.num_prefix_hit_tokens = num_cached
        if self.caching and self.stats is not None:
            self.stats.prefix_queries += seq.num_tokens
            self.stats.prefix_hits += num_cached

    def _register(self, seq: Sequence) -> None:
        """Cache the sequence's full pages whose tokens are all computed and known."""
        full = min(seq.num_cached_tokens, seq.num_tokens - seq.num_pending) // self.page_size
        if full > seq.num_registered_pages:
            hashes = page_hashes(seq.token_ids, self.page_size, seq.block_hashes, full)
            self.manager.register(seq.seq_id, hashes[:full], seq.num_registered_pages)
            seq.num_registered_pages = full

    def _make_room(self, seq: Sequence, num_tokens: int, spare: Sequence | None = None) -> bool:
        """Allocate pages for ``seq``, preempting the newest running sequences (but ``spare``)
        as needed. Returns False when ``seq`` itself had to be preempted."""
        if self.manager.pages_needed(seq.seq_id, num_tokens) == 0:  # most decode rows
            return True
        while not self.manager.can_allocate(seq.seq_id, num_tokens):
            victim = next((s for s in reversed(self.running) if s is not spare), seq)
            self._preempt(victim)
            if victim is seq:
                return False
        self.manager.allocate(seq.seq_id, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.manager.free(seq.seq_id)
        seq.num_cached_tokens = seq.num_registered_pages = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def on_launch(self, batch: ScheduledBatch) -> None:
        """A step was launched: its fed tokens are cached now, and each sampling row gets a
        pending token. Sequences that reach ``max_new_tokens`` finish here; their pages can go
        to the next step at once, since it runs after this one on the device."""
        sample_rows = batch.sample_rows
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_cached_tokens += n
            if self.caching:
                self._register(seq)
        finished = False
        for k, row in enumerate(sample_rows):
            seq = batch.seqs[row]
            batch.pending_index.append(seq.num_tokens)
            seq.append_pending(k)
            if seq.finish_reason == "length":
                self._finish(seq)
                finished = True
        if finished:
            self.running = [s for s in self.running if not s.is_finished]

    def resolve(self, batch: ScheduledBatch, tokens: list[int],
                logprobs: list[TokenLogprob | None] | None = None) -> list[Sequence]:
        """Fill in a launched step's sampled tokens (and their log-probabilities); return the
        sequences that took a token (tokens after an EOS, or of a finished sequence whose tail
        was cut, are dropped)."""
        updated, finished = [], False
        for k, (row, index, token) in enumerate(zip(batch.sample_rows, batch.pending_index, tokens)):
            seq = batch.seqs[row]
            if index >= seq.num_tokens:
                continue
            if seq.resolve(index, token, logprobs[k] if logprobs is not None else None) and not seq.is_finished:
                self._finish(seq)
                finished = True
            if self.suspects and seq is self.suspects[0]:  # it ran a step alone, and that step passed
                self.suspects.popleft()
                seq.passed_alone = True
            updated.append(seq)
        if finished:
            self.running = [s for s in self.running if not s.is_finished]
            if any(s.is_finished for s in self.waiting):  # finished while preempted
                self.waiting = deque(s for s in self.waiting if not s.is_finished)
        return updated

    def _finish(self, seq: Sequence) -> None:
        if seq in self.suspects:
            self.suspects.remove(seq)
        if self.caching and self.manager.has(seq.seq_id):
            self._register(seq)  # its last full pages (a chat's next turn starts with them)
        seq.status = SequenceStatus.FINISHED
        self.manager.free(seq.seq_id)

    def abort(self, seq: Sequence) -> None:
        """Take an unfinished sequence out of the queues and free its pages at once. The next
        step may reuse them: it runs after the step in flight on the device."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish(seq)
