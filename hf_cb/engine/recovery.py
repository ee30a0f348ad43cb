"""What a failed step takes: the request that caused it, and no other.

A mixin of `LLMEngine`, which owns the state these read (its scheduler, the step in flight, the
batch being launched or resolved when `step` raised) and the call they make (`finish`).
"""

from __future__ import annotations

from hf_cb.core.sequence import Sequence


class Recovery:
    """Aborts and failure recovery of an `LLMEngine` (see the module)."""

    def abort_all(self) -> list[Sequence]:
        """Drop the step in flight and every queued sequence, freeing their pages (after an
        error, so that the engine stays usable); return the sequences dropped."""
        return [] if self.asleep else self._abort([*self.scheduler.running, *self.scheduler.waiting])

    def recover(self) -> list[Sequence]:
        """After `step` raised, decide what the failure takes; return the sequences it fails.

        The step in flight is dropped: the sequences whose last token it held are put back to be
        computed again (`Scheduler.requeue`; the same tokens come again, sampling being a function
        of the seed and the position). The rows of the failed step that have not run a step alone
        since an earlier failure become suspects, which then run one at a time
        (`Scheduler.isolate`). A step that fails with one suspect alone fails that one request,
        and the others go on. A step whose rows each passed alone failed as a batch: it fails
        them. A failure before any step was formed fails everything queued, since it would recur."""
        failing, in_flight = self._failing, self._in_flight
        self._failing = self._in_flight = None
        scheduler = self.scheduler
        lost = [s for s in [*scheduler.running, *scheduler.waiting] if s.num_pending]
        if in_flight is not None:  # finished on its last token, which the dropped step held
            lost += [s for s in in_flight.batch.seqs if s.is_finished and s.num_pending]
        rows = failing.seqs if failing is not None else []
        alone = scheduler.suspects[0] if scheduler.suspects else None
        suspects = []
        if alone is not None and rows == [alone]:
            culprits = [alone]
        else:
            suspects = [s for s in rows if not s.passed_alone]
            culprits = [] if suspects else rows or [*scheduler.running, *scheduler.waiting]
        scheduler.requeue([s for s in lost if s not in culprits])
        if culprits:
            return self._abort(culprits)
        scheduler.isolate(suspects)
        return []

    def _abort(self, seqs: list[Sequence]) -> list[Sequence]:
        self._in_flight = self._failing = None
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs
