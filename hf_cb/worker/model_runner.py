"""One step on the model: pack the scheduled rows, run the model's own forward, sample.

`launch` enqueues a step and returns at once with a `StepHandle`; `wait` reads its sampled
tokens, the step's one device-to-host copy. Inputs of decode rows whose previous token is still
pending on the device are filled in there from the previous step's tokens, so the host can
prepare step n+1 while the device runs step n.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from hf_cb.attention.forward import forward_step, step_mask
from hf_cb.attention.shape import AttentionShape
from hf_cb.core.scheduler import ScheduledBatch
from hf_cb.core.sequence import PENDING, Sequence, TokenLogprob
from hf_cb.core.staging import Staging
from hf_cb.distributed.tensor_parallel import TensorParallel
from hf_cb.manager import PageManager, PageTable
from hf_cb.paged_cache import PagedCache
from hf_cb.performance.cuda_graphs import DecodeGraphs
from hf_cb.sampling.sampler import SamplingBatch, compute_logprobs, is_greedy, make_sampling_batch, sample
from hf_cb.worker.prompt_scoring import PromptScoring, prompt_scoring, score, unpack


@dataclass
class StepInputs:
    """The tensors of one forward: a single packed row of ``T`` tokens (or, for a model with
    recurrent state, ``B`` rows of ``T / B`` tokens, staged flat)."""

    table: PageTable
    input_ids: np.ndarray  # [T], pending tokens as 0
    pending_dst: torch.Tensor | None  # positions in input_ids filled on the device...
    pending_src: torch.Tensor | None  # ...from these rows of the previous step's tokens
    logits_indices: np.ndarray  # [S (+ N)]: the last token of each sampling row (then the prompt scoring's)
    slots: torch.Tensor | None = None  # [B]: each row's recurrent-state slot
    scoring: PromptScoring | None = None  # the prompt tokens the step scores (N of them)


@dataclass
class StepHandle:
    """A launched step: its sampled tokens (sample-row order) on the device and, once `event`
    has fired, in ``host_tokens``; likewise its packed log-probabilities when a row asked."""

    batch: ScheduledBatch
    tokens: torch.Tensor
    host_tokens: torch.Tensor
    event: torch.cuda.Event | None
    host_logprobs: torch.Tensor | None = None  # [S, 1 + 2k], see sampling.compute_logprobs
    num_logprobs: int = 0
    scoring: PromptScoring | None = None  # the prompt tokens the step scored...
    host_prompt_logprobs: torch.Tensor | None = None  # ...their [N, 1 + 2k] rows


class ModelRunner:
    def __init__(self, model: torch.nn.Module, forward, cache: PagedCache, manager: PageManager, backend,
                 max_num_tokens: int, max_num_seqs: int, graphs: DecodeGraphs | None = None,
                 tp: TensorParallel | None = None, *, shape: AttentionShape):
        self.model = model
        self.tp = tp  # a TensorParallel: every rank takes rank 0's sampled tokens
        self.forward = forward  # the model itself, or its compiled forward
        self.cache = cache
        self.manager = manager
        self.backend = backend
        self.graphs = graphs
        self.device = model.device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.on_cuda = self.device.type == "cuda"
        # Models with recurrent state run batch-shaped steps (`state_scheduler`).
        self.batch_shaped = bool(cache.state_layers)
        i64 = torch.int64
        self.staging = Staging(self.device, {
            "input_ids": (max_num_tokens, i64), "positions": (max_num_tokens, i64),
            "logits_indices": (max(max_num_seqs, 2) + max_num_tokens, i64),
            "pending_dst": (max_num_seqs, i64), "pending_src": (max_num_seqs, i64),
            "slots": (max_num_seqs, i64),
        })
        self._mask = step_mask(shape, self.device)
        # Pinned buffers are rewritten only after the copies of the previous step have run.
        self._inputs_copied = torch.cuda.Event() if self.on_cuda else None
        # Read-back buffers, two of each: step n+1 is launched before step n's are read.
        self._host: dict[tuple[str, int], torch.Tensor] = {}
        self._parity = 0

    def _host_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """This parity's pinned buffer ``name``, grown to hold ``shape``."""
        key = (name, self._parity)
        buf = self._host.get(key)
        if buf is None or buf.numel() < np.prod(shape):
            buf = self._host[key] = torch.zeros(max(int(np.prod(shape)), 1), dtype=dtype, pin_memory=self.on_cuda)
        return buf[: int(np.prod(shape))].view(shape)

    # -- preparing ---------------------------------------------------------------------------

    def prepare(self, batch: ScheduledBatch, prev: StepHandle | None) -> StepInputs:
        seqs, num_new = batch.seqs, batch.num_new_tokens
        num_cached = [s.num_cached_tokens for s in seqs]
        table = self.manager.build([s.seq_id for s in seqs], num_cached, num_new)
        tokens = chain.from_iterable(s.token_ids[c : c + n] for s, c, n in zip(seqs, num_cached, num_new))
        input_ids = np.fromiter(tokens, dtype=np.int64, count=table.num_tokens)
        pending_dst = pending_src = None
        dst = np.flatnonzero(input_ids == PENDING)
        if len(dst):
            if prev is None:
                raise RuntimeError("hf_cb: a pending token with no step in flight")
            src = np.fromiter((seqs[r].pending_src for r in table.token_rows[dst]), np.int64, len(dst))
            input_ids[dst] = 0
            pending_dst = self.staging.put("pending_dst", dst)[1]
            pending_src = self.staging.put("pending_src", src)[1]
        logits_indices = table.qo_indptr[1:][batch.sample_rows].astype(np.int64) - 1
        scoring = prompt_scoring(batch, table)
        if scoring is not None:  # the sampling rows' logits first, then the scored positions'
            logits_indices = np.concatenate([logits_indices, scoring.indices])
        slots = None
        if self.batch_shaped:
            if len(set(num_new)) > 1 or len({c == 0 for c in num_cached}) > 1:
                raise RuntimeError("hf_cb: a batch-shaped step's rows differ in length or in having a state")
            slots = self.staging.put("slots", np.fromiter((self.manager.row_of(s.seq_id) for s in seqs), np.int64,
                                                          len(seqs)))[1]
            if len(seqs) > 1:  # decode rows: the rows of [B, V] logits
                logits_indices = np.asarray(batch.sample_rows, dtype=np.int64)
        return StepInputs(table, input_ids, pending_dst, pending_src, logits_indices, slots, scoring)

    # -- running -----------------------------------------------------------------------------

    def launch(self, batch: ScheduledBatch, prev: StepHandle | None) -> StepHandle:
        """Enqueue one step; returns without waiting for the device."""
        if self._inputs_copied is not None:
            self._inputs_copied.synchronize()
        inputs = self.prepare(batch, prev)
        for fork in batch.forks:  # n samples of a prompt: copies of the one that computed it
            self.cache.copy_slot(fork.src_slot, fork.dst_slot)
            if fork.src_page is not None:
                self.cache.copy_page(fork.src_page, fork.dst_page)
        sampling = self._sampling_batch(batch)
        prev_tokens = prev.tokens if prev is not None else None
        graph_size = self.graphs.size_for(len(batch.seqs)) if self.graphs is not None and batch.is_decode else None
        if graph_size is not None:
            self.graphs.prepare(graph_size, inputs.table, inputs.input_ids)
            fill_pending(self.graphs.input_ids, inputs, prev_tokens)
            self._record_inputs_copied()
            tokens, logits = self.graphs.replay(graph_size, len(batch.seqs))
            if not is_greedy(sampling):
                tokens = sample(logits.float(), sampling)
        else:
            if self.batch_shaped and len(batch.seqs) > 1:
                logits = self._forward_batch_shaped(batch, inputs, prev_tokens)
            else:  # a packed step, or one sequence's prefill chunk of a model with recurrent state
                with self._states_of(batch, inputs):
                    logits = self._forward_eager(inputs, prev_tokens)
            logits, prompt_logits = logits[: len(batch.sample_rows)], logits[len(batch.sample_rows) :]
            tokens = sample(logits.float(), sampling)
        if self.tp is not None:
            self.tp.broadcast_tokens(tokens)
        logprobs = None
        if sampling.num_logprobs is not None:
            logprobs = compute_logprobs(logits, tokens, sampling.num_logprobs)
        handle = self._read_back(batch, tokens, logprobs, sampling.num_logprobs or 0)
        if inputs.scoring is not None:
            targets = torch.from_numpy(inputs.scoring.targets).to(self.device)
            rows = score(prompt_logits, targets, inputs.scoring.k)
            handle.host_prompt_logprobs = self._host_buffer("prompt_logprobs", tuple(rows.shape), torch.float32)
            handle.host_prompt_logprobs.copy_(rows, non_blocking=self.on_cuda)
            handle.scoring = inputs.scoring
            if handle.event is not None:
                handle.event.record()  # after this copy too
        return handle

    def _states_of(self, batch: ScheduledBatch, inputs: StepInputs):
        """The step's recurrent states bound for its forward (a model without: nothing)."""
        if not self.batch_shaped:
            return nullcontext()
        return self.cache.bound(inputs.slots, batch.seqs[0].num_cached_tokens == 0)

    def _forward_eager(self, inputs: StepInputs, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[S, V]`` of the sampling rows, from the model's own forward."""
        put = self.staging.put
        input_ids = put("input_ids", inputs.input_ids)[1]
        fill_pending(input_ids, inputs, prev_tokens)
        position_ids = put("positions", inputs.table.positions)[1]
        # At least two rows of logits (the extra ones dropped below): a compiled forward would
        # recompile for 0 and for 1.
        num_logits = len(inputs.logits_indices)
        logits_indices = put("logits_indices", np.pad(inputs.logits_indices, (0, max(0, 2 - num_logits))))[1]
        step = self.backend.plan(inputs.table)
        self._record_inputs_copied()
        logits = forward_step(self.forward, self.model, self.cache, step, input_ids[None], position_ids[None],
                              self._mask, logits_indices)
        if self.backend.new_kinds:
            # A kind of layer was planned inside the forward, after the copy event: let those
            # copies finish before the pinned buffers are rewritten (first steps only).
            torch.cuda.synchronize(self.device)
            self.backend.new_kinds = False
        return logits[:num_logits]

    def _forward_batch_shaped(self, batch: ScheduledBatch, inputs: StepInputs,
                              prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[S, V]`` of the sampling rows of a batch-shaped step (``B`` rows of ``L``
        tokens; `state_scheduler`), with the rows' recurrent states bound from their slots."""
        rows, length = len(batch.seqs), batch.num_new_tokens[0]
        input_ids = self.staging.put("input_ids", inputs.input_ids)[1]
        fill_pending(input_ids, inputs, prev_tokens)
        position_ids = self.staging.put("positions", inputs.table.positions)[1]
        step = self.backend.plan(inputs.table)
        self._record_inputs_copied()
        with self._states_of(batch, inputs):
            logits = forward_step(self.forward, self.model, self.cache, step, input_ids.view(rows, length),
                                  position_ids.view(rows, length), self._mask, 1)
        return logits[torch.from_numpy(inputs.logits_indices).to(logits.device)]

    def _record_inputs_copied(self) -> None:
        if self._inputs_copied is not None:
            self._inputs_copied.record()

    def _sampling_batch(self, batch: ScheduledBatch) -> SamplingBatch:
        seqs = [batch.seqs[r] for r in batch.sample_rows]
        return make_sampling_batch(
            [s.params for s in seqs],
            [s.seed for s in seqs],
            [s.token_ids for s in seqs],
            [s.num_generated for s in seqs],
            self.vocab_size,
            self.device,
        )

    def _read_back(self, batch: ScheduledBatch, tokens: torch.Tensor, logprobs: torch.Tensor | None,
                   num_logprobs: int) -> StepHandle:
        self._parity ^= 1
        host = self._host_buffer("tokens", tuple(tokens.shape), torch.int64)
        host.copy_(tokens, non_blocking=self.on_cuda)
        host_logprobs = None
        if logprobs is not None:
            host_logprobs = self._host_buffer("logprobs", tuple(logprobs.shape), torch.float32)
            host_logprobs.copy_(logprobs, non_blocking=self.on_cuda)
        event = None
        if self.on_cuda:
            event = torch.cuda.Event()
            event.record()
        return StepHandle(batch, tokens, host, event, host_logprobs, num_logprobs)

    def wait(self, handle: StepHandle) -> tuple[list[int], list[TokenLogprob | None] | None]:
        """The step's sampled tokens, in sample-row order (the one sync of a step), and their
        log-probabilities for the rows that asked."""
        if handle.event is not None:
            handle.event.synchronize()
        tokens = handle.host_tokens.tolist()
        if handle.host_logprobs is None:
            return tokens, None
        wants = [handle.batch.seqs[r].params.logprobs for r in handle.batch.sample_rows]
        return tokens, unpack_logprobs(tokens, handle.host_logprobs.tolist(), wants, handle.num_logprobs)

    def prompt_logprobs(self, handle: StepHandle) -> list[tuple[Sequence, int, TokenLogprob]]:
        """The prompt tokens a waited-for step scored: (sequence, position, `TokenLogprob`)."""
        if handle.scoring is None:
            return []
        return unpack(handle.scoring, handle.host_prompt_logprobs.tolist())

    def run(self, batch: ScheduledBatch) -> list[int]:
        """Launch one step and wait for its tokens (no overlap)."""
        return self.wait(self.launch(batch, None))[0]


def fill_pending(input_ids: torch.Tensor, inputs: StepInputs, prev_tokens: torch.Tensor | None) -> None:
    """Write, in place on the device, the input tokens the previous step is still sampling. In
    place: a new tensor in place of the staged view changes what torch.compile guards on (its
    ``_base``), and the first step with pending tokens then recompiled the forward mid-run
    (about 1.3 s on llama-1b, measured on an H200)."""
    if inputs.pending_dst is not None:
        input_ids.index_copy_(0, inputs.pending_dst, prev_tokens.index_select(0, inputs.pending_src))


def unpack_logprobs(tokens: list[int], rows: list[list[float]], wants: list[int | None],
                    k: int) -> list[TokenLogprob | None]:
    """`TokenLogprob`s from `compute_logprobs` rows: each row keeps the alternatives it asked
    for (``wants``; None: no log-probabilities)."""
    return [
        None if want is None else TokenLogprob(token, row[0], [(int(i), lp) for i, lp in zip(row[1 : 1 + want], row[1 + k : 1 + k + want])])
        for token, row, want in zip(tokens, rows, wants)
    ]
