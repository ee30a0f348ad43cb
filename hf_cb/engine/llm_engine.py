"""The engine: a page pool, a scheduler and a model runner around one model.

It lives on the model between calls (`get_engine`), so the page pool is allocated once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from itertools import count

import torch
from tqdm.auto import tqdm

from hf_cb.attention.backends.selector import make_backend
from hf_cb.attention_interface import ATTENTION_NAME, register
from hf_cb.core.config import EngineConfig
from hf_cb.core.limits import RequestLimits
from hf_cb.core.scheduler import ScheduledBatch
from hf_cb.core.sequence import FinishReason, Sequence
from hf_cb.core.stats import StepStats
from hf_cb.distributed.tensor_parallel import TensorParallel, tensor_parallel_group
from hf_cb.engine.lifecycle import EngineLifecycle
from hf_cb.engine.pool import EnginePool
from hf_cb.engine.recovery import Recovery
from hf_cb.engine.tp_rank import TensorParallelRank
from hf_cb.engine.weights import weights_state
from hf_cb.model_support.probe import add_step_hooks, probe_attention
from hf_cb.model_support.shape import context_length
from hf_cb.paged_cache import PagedCache, kv_cache_dtype
from hf_cb.performance.compile import compile_forward, frozen_heap
from hf_cb.performance.fused_projections import FusedGroup, fuse_projections
from hf_cb.sampling.params import SamplingParams, check_seed
from hf_cb.worker.model_runner import StepHandle

logger = logging.getLogger("hf_cb")
# The longest sequence of a model without attention (Mamba) whose config names no context length.
UNBOUNDED_MODEL_LEN = 1 << 16


class LLMEngine(EnginePool, EngineLifecycle, Recovery, TensorParallelRank):
    """Continuous batching over a paged KV cache for one Transformers causal LM."""

    def __init__(self, model: torch.nn.Module, config: EngineConfig | None = None):
        register()
        # requested: as the caller gave it (`get_engine` compares it); config: with the
        # device's defaults filled in, which every part of the engine reads.
        self.requested_config = config or EngineConfig()
        self.config = config = self.requested_config.resolved(model.device)
        self.model = model
        # Tensor parallel: rank 0 decides the requests, the pool size and the sampled tokens.
        group = tensor_parallel_group(model)
        self.tp = TensorParallel(group) if group is not None else None
        # Judge the model by what it does (one recording forward, one tiny step), not by its class's flags.
        probe = probe_attention(model)
        self.shape = probe.shape
        self.chunked_prefill = probe.chunked_prefill
        self._step_hooks = add_step_hooks(model) if probe.needs_hooks else []
        self._original_attn = model.config._attn_implementation
        self.fused: list[FusedGroup] = []
        try:
            self._start(model, config)
        except BaseException:
            self._detach()
            raise

    def _start(self, model: torch.nn.Module, config: EngineConfig) -> None:
        self.max_model_len = config.max_model_len or context_length(model)
        if self.max_model_len is None and not self.shape.attention:  # Mamba: no positions, no limit
            self.max_model_len = UNBOUNDED_MODEL_LEN
        if self.max_model_len is None:
            raise ValueError(f"{type(model).__name__}'s config names no context length: set EngineConfig.max_model_len")
        if self.shape.stateful:
            self.config = config = self._state_config(config)
        self.max_pages_per_seq = -(-self.max_model_len // config.page_size)
        self.max_num_page_ids = config.max_num_seqs * self.max_pages_per_seq  # page ids in one step
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.device = model.device
        self.dtype = model.dtype
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        if self.kv_dtype != self.dtype and any(s.context for s in self.shape.attention):
            raise ValueError("kv_cache_dtype='fp8' is not supported for models that expand a compressed K/V cache "
                             "(MLA) yet")
        self.page_bytes = PagedCache.bytes_per_page(self.shape.layers, config.page_size, self.kv_dtype)
        self.backend = make_backend(config, self.shape, self.dtype, self.device, self.max_num_page_ids,
                                    kv_dtype=self.kv_dtype, max_pages_per_seq=self.max_pages_per_seq)
        if config.fuse_projections and self.tp is None:  # a tensor-parallel shard's weights are DTensors
            self.fused = fuse_projections(model)
        compiles = config.compile if config.compile is not None else self._replays_graphs()
        if compiles and self.shape.stateful:
            logger.info("hf_cb: the forward is not compiled for a model with recurrent state")
            compiles = False
        if compiles and any(s.context for s in self.shape.attention):
            # Their cache update gathers each sequence's context: not traced yet, so not compiled.
            logger.info("hf_cb: the forward is not compiled for a model that expands its cached K/V (MLA)")
            compiles = False
        self.forward = compile_forward(model) if compiles else model

        model.set_attn_implementation(ATTENTION_NAME)
        self._seq_ids = count()
        self._in_flight: StepHandle | None = None
        self._failing: ScheduledBatch | None = None  # the step being launched or resolved
        self.owner = None  # the OnlineEngine whose thread steps this engine, if any
        self.num_generated_tokens = 0
        self.stats = StepStats()
        self.startup_s: dict[str, float] = {}  # seconds of the build's slow parts, by name

        self.num_pages = num_pages = self._num_pages()
        self._build(num_pages)
        self._capture_graphs()
        self._weights = weights_state(model)
        logger.info(
            "hf_cb: %d KV pages of %d tokens: %d tokens of KV cache (%.2f GiB), %s attention",
            num_pages, config.page_size, num_pages * config.page_size,
            num_pages * self.page_bytes / 2**30, type(self.backend).__name__,
        )

    # -- requests ----------------------------------------------------------------------------

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.vocab_size, self.max_model_len, self.config.page_size, self.num_pages)

    def check_request(self, index: int, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise a ValueError naming the problem if the request can never run."""
        self.limits.check(index, prompt_ids, params)

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams, seed: int, index: int = 0) -> Sequence:
        """Queue a request (checked first); it runs from the next `step`. A sleeping engine
        wakes up."""
        self.check_request(index, prompt_ids, params)
        check_seed(seed)
        self.wake_up()
        seq = Sequence(next(self._seq_ids), list(prompt_ids), params, seed, index)
        self.scheduler.add(seq)
        if self.tp is not None:  # tensor parallel: rank 0 sends it (and its seed) at the next step
            self.tp.on_add(seq)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason = "abort", num_generated: int | None = None) -> None:
        """End a sequence early: a stop string found by the caller (keep ``num_generated``
        tokens) or an abort (keep what is resolved). Its pages are freed at once; tokens still
        in flight for it are dropped when they arrive."""
        seq.truncate(seq.num_resolved if num_generated is None else num_generated)
        seq.finish_reason = reason
        self.scheduler.abort(seq)
        if self.tp is not None:  # tensor parallel: rank 0 sends it at the next step
            self.tp.on_finish(seq, reason, num_generated)

    # -- running -----------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return not self.asleep and (self.scheduler.has_unfinished() or self._in_flight is not None)

    def step(self) -> list[Sequence]:
        """Launch the next step and resolve the one in flight; return the sequences that got a
        token (a sequence is done when ``seq.is_done``). With ``async_scheduling`` the next step
        is launched before the previous one's tokens are read, so the host prepares step n+1
        while the device runs step n; a step whose rows read their generated tokens (penalties)
        waits for them first."""
        if self.tp is not None:  # tensor parallel: apply rank 0's requests and aborts first
            self._apply_leader_ops(self.tp.sync())
        updated: list[Sequence] = []
        prev = self._in_flight  # stays in flight until resolved: `recover` reads it after an error
        if prev is not None and not self._can_overlap():
            updated += self._resolve(prev)
            prev = self._in_flight = None
        handle = self._launch_next(prev) if self.scheduler.has_unfinished() else None
        if prev is not None:
            updated += self._resolve(prev)
        self._in_flight, self._failing = handle, None
        return updated

    def _can_overlap(self) -> bool:
        return self.config.async_scheduling and not any(s.params.needs_history for s in self.scheduler.running)

    def run(self, seqs: list[Sequence], progress: bool = False,
            on_step: Callable[[list[Sequence]], None] | None = None) -> None:
        """Step until every queued sequence is done. On any error (Ctrl-C included) the queue
        is dropped and its pages freed, so the engine stays usable. ``on_step`` gets each step's
        updated sequences (stop strings, streamers and profilers hook in there)."""
        self.sync_weights()
        bar = tqdm(total=len(seqs), disable=not progress, unit="req", desc="hf_cb")
        try:
            with frozen_heap():
                self._step_until_done(bar, on_step)
        except BaseException:
            self.abort_all()
            raise
        finally:
            bar.close()

    def _step_until_done(self, bar: tqdm, on_step: Callable[[list[Sequence]], None] | None) -> None:
        start, generated_before = time.perf_counter(), self.num_generated_tokens
        queries_before, hits_before = self.prefix_cache_stats()
        while self.has_unfinished():
            updated = self.step()
            if on_step is not None:
                on_step(updated)
            done = sum(s.is_done for s in updated)
            if done:
                rate = (self.num_generated_tokens - generated_before) / (time.perf_counter() - start)
                queries, hits = self.prefix_cache_stats()
                cached = (hits - hits_before) / max(queries - queries_before, 1)
                bar.set_postfix(tok_s=f"{rate:.0f}", cached=f"{cached:.0%}", refresh=False)
                bar.update(done)

    def _launch_next(self, prev: StepHandle | None) -> StepHandle | None:
        """Schedule and launch the next step (None when nothing can run until ``prev`` resolves)."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        self._failing = batch  # until the step is launched
        if not batch.seqs:
            if prev is None:
                raise RuntimeError("hf_cb: no request could be scheduled (page pool too small?)")
            return None
        handle = self.runner.launch(batch, prev)
        self.scheduler.on_launch(batch)
        if self.tp is not None:
            self.tp.on_launch(batch)
        self.stats.steps += 1
        self.stats.decode_steps += batch.is_decode
        self.stats.tokens += sum(batch.num_new_tokens)
        self.stats.host_s += time.perf_counter() - start
        return handle

    def _resolve(self, handle: StepHandle) -> list[Sequence]:
        start = time.perf_counter()
        self._failing = handle.batch
        tokens, logprobs = self.runner.wait(handle)
        for seq, position, logprob in self.runner.prompt_logprobs(handle):
            seq.prompt_logprobs[position] = logprob
        waited = time.perf_counter()
        updated = self.scheduler.resolve(handle.batch, tokens, logprobs)
        self.num_generated_tokens += len(updated)  # not the tokens dropped after an EOS
        self.stats.wait_s += waited - start
        self.stats.host_s += time.perf_counter() - waited
        return updated

    def release(self) -> None:
        """Give the model back its attention implementation; drop the pages."""
        if not self.asleep:
            self.abort_all()
            self.cache.layers.clear()
        self._detach()

    def _detach(self) -> None:
        """Take hf_cb's hooks and attention implementation off the model."""
        for hook in self._step_hooks:
            hook.remove()
        for group in self.fused:
            group.unfuse()
        self.fused = []
        self.model.set_attn_implementation(self._original_attn)
