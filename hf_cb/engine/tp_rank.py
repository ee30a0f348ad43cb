"""What an engine does as one rank of a tensor-parallel group (`hf_cb.distributed.tensor_parallel`):
apply rank 0's requests, aborts and resets before each step, and, on a server's other ranks,
follow rank 0's steps.

A mixin of `LLMEngine`, which owns the state these read (``tp``, the scheduler) and the calls
they make (`add_request`, `finish`, `reset_prefix_cache`, `step`).
"""

from __future__ import annotations

from hf_cb.distributed.tensor_parallel import Stopped


class TensorParallelRank:
    """The tensor-parallel side of an `LLMEngine` (see the module)."""

    def _apply_leader_ops(self, ops: list[tuple]) -> None:
        """Tensor parallel, a rank other than the first: rank 0's requests, aborts and resets
        since its last step, in order. A rank that runs the same program (an offline ``generate``)
        made the same requests itself: they are checked, and take rank 0's seeds; a follower
        (`follow`) makes them here."""
        for op in ops:
            if op[0] == "add":
                _, seq_id, prompt_ids, params, seed = op
                seq = self.tp.take_local(seq_id)
                if seq is None:  # a follower: rank 0's request is new here
                    seq = self.add_request(prompt_ids, params, seed)
                    self.tp.take_local(seq.seq_id)
                if seq.seq_id != seq_id or seq.prompt_ids != prompt_ids or seq.params != params:
                    raise ValueError(f"hf_cb: tensor-parallel rank {self.tp.rank}'s request {seq.seq_id} differs "
                                     "from rank 0's: every rank must make the same generate calls")
                seq.seed = seed  # unseeded requests drew theirs from each rank's own generator
            elif op[0] == "reset":
                self.reset_prefix_cache()
            else:  # "finish": an abort or a stop string; here already if every rank ran the same hooks
                _, seq_id, reason, num_generated = op
                seq = next((s for s in [*self.scheduler.running, *self.scheduler.waiting] if s.seq_id == seq_id), None)
                if seq is not None:
                    self.finish(seq, reason, num_generated)

    def follow(self) -> None:
        """Tensor parallel, a rank other than its group's first, whose requests come from elsewhere
        (rank 0's HTTP server): step in step with rank 0 until rank 0 calls ``tp.stop()``."""
        if self.tp is None or self.tp.is_leader:
            raise ValueError("follow() runs the other ranks of a tensor-parallel model")
        try:
            while True:
                self.step()
        except Stopped:
            pass
