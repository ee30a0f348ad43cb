"""Scheduling for models whose layers keep a recurrent state per sequence (linear attention,
state-space, convolution layers).

Their layers run on batch-shaped inputs: Transformers' recurrent kernels and short convolutions
keep the rows of a batch apart, not the sequences packed in one row. So a step is either every
running sequence's next token (decode rows, ``[B, 1]``), or the next prefill chunk of one
sequence (``[1, L]``), the two alternating while both have work. A sequence's slot in the state
pool is its block-table row: taken at admission, freed with its pages at finish, abort or
preemption (a preempted sequence is recomputed from its tokens).

The ``n`` samples of a prompt (waiting sequences with the same prompt, "twins") prefill it
once: the first one admitted stops its prefill one token short of its prompt, then each twin
takes a copy of its state and its K/V (`Fork`: full pages shared, the partial one copied), and
all of them feed the prompt's last token together in the next decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_cb.core.config import EngineConfig
from hf_cb.core.scheduler import ScheduledBatch, Scheduler
from hf_cb.core.sequence import Sequence, SequenceStatus
from hf_cb.core.stats import StepStats
from hf_cb.manager import PageManager


@dataclass(frozen=True)
class Fork:
    """Before a step: give slot ``dst_slot`` the states of ``src_slot``, and page ``dst_page``
    the K/V of ``src_page`` (a partial page; None when the prefix fills whole pages)."""

    src_slot: int
    dst_slot: int
    src_page: int | None
    dst_page: int | None


class StateScheduler(Scheduler):
    def __init__(self, config: EngineConfig, manager: PageManager, stats: StepStats | None = None):
        super().__init__(config, manager, stats)
        self._prefill_turn = False  # whether the next step prefills, when both kinds have work

    def schedule(self) -> ScheduledBatch:
        if self.suspects:
            return self._schedule_alone(self.suspects[0])
        forks = self._fork_twins()
        decode = [s for s in self.running if _decode_ready(s)]
        if decode and (forks or not (self._prefill_turn and self._has_prefill_work())):
            self._prefill_turn = True
            batch = self._decode_step()
            batch.forks = forks
            if batch.seqs:
                return batch
        self._prefill_turn = False
        batch = self._prefill_step()
        if not batch.seqs and decode:
            batch = self._decode_step()
        return batch

    def _has_prefill_work(self) -> bool:
        return any(not _decode_ready(s) for s in self.running) or (
            bool(self.waiting) and len(self.running) < self.max_num_seqs)

    def _decode_step(self) -> ScheduledBatch:
        """Every decode-ready running sequence's next token, oldest first; pages made as
        `Scheduler.schedule` makes them (preempting the newest)."""
        batch = ScheduledBatch([], [])
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or len(batch.seqs) == self.max_num_batched_tokens:
                break  # preempted for an older row, with every newer one; or the step is full
            if not _decode_ready(seq):
                continue
            if not self._make_room(seq, seq.num_cached_tokens + 1):
                break
            batch.seqs.append(seq)
            batch.num_new_tokens.append(1)
        return batch

    def _prefill_step(self) -> ScheduledBatch:
        """The next chunk of the oldest running sequence that is prefilling, else of a newly
        admitted one."""
        batch = ScheduledBatch([], [])
        seq = next((s for s in self.running if not _decode_ready(s)), None)
        if seq is not None:
            n = self._chunk(seq)
            if self._make_room(seq, seq.num_cached_tokens + n):
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
            return batch
        if len(self.running) >= self.max_num_seqs:
            return batch
        seq = next((s for s in self.waiting if not self._waits_for_fork(s)), None)
        if seq is None:
            return batch
        if any(_twins(seq, w) for w in self.waiting if w is not seq) and len(seq.prompt_ids) > 1:
            seq.fork_point = len(seq.prompt_ids) - 1
        n = self._chunk(seq)
        if not self.manager.can_allocate(seq.seq_id, n):
            return batch
        self.manager.allocate(seq.seq_id, n)
        self._start_at(seq, 0, 0)
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        return batch

    def _chunk(self, seq: Sequence) -> int:
        """Tokens of the sequence's next prefill chunk: the rest, within the step's token
        budget, and up to its fork point."""
        end = seq.num_tokens if seq.fork_point is None else seq.fork_point
        return max(1, min(end - seq.num_cached_tokens, self.max_num_batched_tokens))

    def _waits_for_fork(self, seq: Sequence) -> bool:
        """Whether a running twin is computing this waiting sequence's prompt, to fork it."""
        return any(r.fork_point is not None and _twins(r, seq) for r in self.running)

    def _fork_twins(self) -> list[Fork]:
        """Admit the waiting twins of each running sequence that has reached its fork point,
        as copies of it (as many as slots and pages allow; the others prefill on their own)."""
        forks: list[Fork] = []
        for parent in [s for s in self.running if s.fork_point is not None and s.num_cached_tokens >= s.fork_point]:
            at_fork_point, parent.fork_point = parent.num_cached_tokens == parent.fork_point, None
            for twin in [w for w in self.waiting if _twins(parent, w)] if at_fork_point else []:
                fork = self._fork(parent, twin)
                if fork is None:
                    break
                forks.append(fork)
        return forks

    def _fork(self, parent: Sequence, twin: Sequence) -> Fork | None:
        n = parent.num_cached_tokens
        partial = n % self.page_size != 0
        if len(self.running) >= self.max_num_seqs or self.manager.num_free_pages < partial:
            return None
        self.manager.fork(parent.seq_id, twin.seq_id, n)
        self.manager.allocate(twin.seq_id, n)  # a row, and the partial page of its own
        src_page = dst_page = None
        if partial:
            src_page = int(self.manager.pages_of(parent.seq_id)[n // self.page_size])
            dst_page = int(self.manager.pages_of(twin.seq_id)[n // self.page_size])
        self._start_at(twin, n, 0)
        self.waiting.remove(twin)
        twin.status = SequenceStatus.RUNNING
        self.running.append(twin)
        return Fork(self.manager.row_of(parent.seq_id), self.manager.row_of(twin.seq_id), src_page, dst_page)


def _decode_ready(seq: Sequence) -> bool:
    """The sequence has a state and one token to feed: it joins a decode step."""
    return seq.num_cached_tokens > 0 and seq.num_tokens - seq.num_cached_tokens == 1


def _twins(a: Sequence, b: Sequence) -> bool:
    """``b`` is waiting, fresh, with ``a``'s prompt (a sample of the same request, say), and does
    not score its prompt (a copy's prompt is not computed)."""
    return (b.status is SequenceStatus.WAITING and b.num_cached_tokens == 0 and b.num_generated == 0
            and b.params.prompt_logprobs is None and a.prompt_ids == b.prompt_ids)
