"""The engine: a page pool, a scheduler and a model runner around one model.

It lives on the model between calls (`get_engine`), so the page pool is allocated once.
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import asdict, dataclass
from itertools import count

import torch
from tqdm.auto import tqdm

from .attention_interface import ATTENTION_NAME, register
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .flashinfer_backend import FlashInferBackend
from .flashinfer_backend import unsupported_reason as flashinfer_unsupported_reason
from .manager import PageManager
from .model_support import AttentionShape, add_step_hooks, attention_shape, layer_windows, probe_attention
from .model_runner import ModelRunner, StepHandle
from .paged_cache import PagedCache
from .sampling import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import FinishReason, Sequence
from .torch_backend import TorchAttentionBackend

logger = logging.getLogger("hf_cb")

def make_backend(config: EngineConfig, shape: AttentionShape, dtype: torch.dtype, device: torch.device,
                 max_num_page_ids: int):
    """FlashInfer on CUDA where it can serve the model, the PyTorch backend otherwise."""
    if config.attention_backend == "torch":
        return TorchAttentionBackend(config.page_size, device)
    if device.type != "cuda":
        if config.attention_backend == "flashinfer":
            raise ValueError(f"the FlashInfer backend needs a CUDA model, this one is on {device}")
        return TorchAttentionBackend(config.page_size, device)
    reason = flashinfer_unsupported_reason(dtype, shape.head_dim)
    if reason:
        if config.attention_backend == "flashinfer":
            raise ValueError(reason)
        warnings.warn(f"hf_cb: using the PyTorch attention backend on CUDA: {reason}", stacklevel=3)
        return TorchAttentionBackend(config.page_size, device)
    return FlashInferBackend(
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        page_size=config.page_size,
        dtype=dtype,
        device=device,
        max_num_seqs=config.max_num_seqs,
        max_num_tokens=config.max_num_batched_tokens,
        max_num_page_ids=max_num_page_ids,
        prefill_backend=config.prefill_backend,
        decode_tensor_cores=config.decode_tensor_cores,
    )


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask of an engine; checkable away from it (an HTTP front end)."""

    vocab_size: int
    max_model_len: int
    page_size: int
    num_pages: int

    def check(self, index: int, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise a ValueError naming the problem if the request can never run."""
        if len(prompt_ids) == 0:
            raise ValueError(f"prompt {index} is empty")
        bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool)]
        if bad:
            raise ValueError(f"prompt {index} has a token id that is not an integer: {bad[0]!r}")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt {index} has token id {bad[0]} outside the vocabulary (size {self.vocab_size})")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt {index} has {len(prompt_ids)} tokens and asks for {params.max_new_tokens} "
                f"new tokens: {total} exceeds the model's context of {self.max_model_len}"
            )
        pages = -(-total // self.page_size)
        if pages > self.num_pages:
            raise ValueError(
                f"prompt {index} needs {pages} pages ({total} tokens) but the page pool has "
                f"{self.num_pages}; raise EngineConfig.num_pages"
            )


@dataclass
class StepStats:
    """Where the host's time goes: ``host_s`` scheduling, preparing and launching steps and
    reading their results; ``wait_s`` blocked on the device for sampled tokens."""

    steps: int = 0
    decode_steps: int = 0
    host_s: float = 0.0
    wait_s: float = 0.0

    def summary(self) -> dict:
        per_step = max(self.steps, 1) * 1e-3
        return {**asdict(self), "host_ms_per_step": self.host_s / per_step, "wait_ms_per_step": self.wait_s / per_step}


def compile_forward(model: torch.nn.Module, num_layers: int):
    """``torch.compile`` of the model's own forward, shapes dynamic (the step size varies)."""
    import torch._dynamo

    # Each layer's attention module is a separate specialisation (its layer_idx is static).
    limit = max(torch._dynamo.config.recompile_limit, 4 * num_layers)
    torch._dynamo.config.recompile_limit = limit
    return torch.compile(model, dynamic=True)


def freeze_heap() -> None:
    """Take every object alive now out of the cyclic garbage collector's walks. Compilation
    and graph capture leave millions of long-lived objects, and a full collection over them in
    the middle of a run stalls the host (vLLM freezes its heap after start-up for the same
    reason). `hf_cb.release` unfreezes."""
    gc.collect()
    gc.freeze()


class LLMEngine:
    """Continuous batching over a paged KV cache for one Transformers causal LM."""

    def __init__(self, model: torch.nn.Module, config: EngineConfig | None = None):
        register()
        self.config = config = config or EngineConfig()
        self.model = model
        self.windows = layer_windows(model)
        self.shape = attention_shape(model)
        # Judge the model by what it does (one tiny step), not by its class's flags.
        self._step_hooks = add_step_hooks(model) if probe_attention(model) else []
        self._original_attn = model.config._attn_implementation
        try:
            self._start(model, config)
        except BaseException:
            self._detach()
            raise

    def _start(self, model: torch.nn.Module, config: EngineConfig) -> None:
        text_config = model.config.get_text_config(decoder=True)
        self.max_model_len = config.max_model_len or text_config.max_position_embeddings
        self.max_pages_per_seq = -(-self.max_model_len // config.page_size)
        self.max_num_page_ids = config.max_num_seqs * self.max_pages_per_seq  # page ids in one step
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.device = model.device
        self.dtype = model.dtype
        self.page_bytes = PagedCache.bytes_per_page(
            self.shape.num_layers, config.page_size, self.shape.num_kv_heads, self.shape.head_dim, self.dtype
        )
        self.backend = make_backend(config, self.shape, self.dtype, self.device, self.max_num_page_ids)
        self.forward = compile_forward(model, self.shape.num_layers) if config.compile else model

        model.set_attn_implementation(ATTENTION_NAME)
        self._seq_ids = count()
        self._in_flight: StepHandle | None = None
        self.owner = None  # the OnlineEngine whose thread steps this engine, if any
        self.num_generated_tokens = 0
        self.stats = StepStats()

        if config.num_pages is not None:
            num_pages = config.num_pages
        elif self.device.type == "cuda":
            num_pages = self._profile_num_pages()
        else:
            num_pages = max(1, min(config.cpu_max_pages, config.cpu_kv_cache_bytes // self.page_bytes))
        self._build(num_pages)
        if config.cuda_graphs and isinstance(self.backend, FlashInferBackend):
            self._capture_graphs()
        freeze_heap()
        logger.info(
            "hf_cb: %d KV pages of %d tokens: %d tokens of KV cache (%.2f GiB), %s attention",
            num_pages, config.page_size, num_pages * config.page_size,
            num_pages * self.page_bytes / 2**30, type(self.backend).__name__,
        )

    def _build(self, num_pages: int) -> None:
        """(Re)create the page pool and everything that holds it."""
        config, shape = self.config, self.shape
        self.cache = PagedCache(
            shape.num_layers, num_pages, config.page_size, shape.num_kv_heads, shape.head_dim,
            self.dtype, self.device, sliding_layers=[w is not None for w in self.windows],
        )
        self.manager = PageManager(num_pages, config.page_size, config.max_num_seqs, self.max_pages_per_seq)
        self.scheduler = Scheduler(config, self.manager)
        self.runner = ModelRunner(
            self.model, self.forward, self.cache, self.manager, self.backend,
            max_num_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
        )

    def _capture_graphs(self) -> None:
        start = time.perf_counter()
        graphs = DecodeGraphs(
            self.model, self.forward, self.cache, self.backend, self.config.max_num_seqs, self.max_num_page_ids
        )
        graphs.capture()
        self.runner.graphs = graphs
        logger.info("hf_cb: captured %d decode graphs in %.1f s", len(graphs.sizes), time.perf_counter() - start)

    def _profile_num_pages(self) -> int:
        """Run one worst-case step (``max_num_batched_tokens`` tokens, logits and sampling for
        ``max_num_seqs`` rows) on a throwaway pool, then give ``memory_utilization`` of the
        memory that remains beside its peak to pages."""
        config = self.config
        rows = min(config.max_num_seqs, config.max_num_batched_tokens)
        per_row = min(config.max_num_batched_tokens // rows, self.max_model_len)
        self._build(rows * -(-per_row // config.page_size))
        params = SamplingParams(
            1, do_sample=True, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
            eos_token_ids=(0,), min_new_tokens=1,
        )
        seqs = [Sequence(-1 - i, [1] * per_row, params, seed=i) for i in range(rows)]
        for s in seqs:
            self.manager.allocate(s.seq_id, per_row)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.runner.run(ScheduledBatch(seqs, [per_row] * rows))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del self.cache, self.manager, self.scheduler, self.runner
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = config.memory_utilization * (free - peak)
        num_pages = int(budget // self.page_bytes)
        if num_pages * config.page_size < self.max_model_len:
            raise RuntimeError(
                f"hf_cb: only {num_pages} KV pages fit in GPU memory (a worst-case step takes "
                f"{peak / 2**30:.2f} GiB); lower max_num_batched_tokens or max_num_seqs"
            )
        logger.info("hf_cb: a worst-case step peaks at %.2f GiB; %.2f GiB free", peak / 2**30, free / 2**30)
        return num_pages

    # -- requests ----------------------------------------------------------------------------

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.vocab_size, self.max_model_len, self.config.page_size, self.manager.num_pages)

    def check_request(self, index: int, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise a ValueError naming the problem if the request can never run."""
        self.limits.check(index, prompt_ids, params)

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams, seed: int, index: int = 0) -> Sequence:
        """Queue a request (checked first); it runs from the next `step`."""
        self.check_request(index, prompt_ids, params)
        seq = Sequence(next(self._seq_ids), list(prompt_ids), params, seed, index)
        self.scheduler.add(seq)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason = "abort", num_generated: int | None = None) -> None:
        """End a sequence early: a stop string found by the caller (keep ``num_generated``
        tokens) or an abort (keep what is resolved). Its pages are freed at once; tokens still
        in flight for it are dropped when they arrive."""
        seq.truncate(seq.num_resolved if num_generated is None else num_generated)
        seq.finish_reason = reason
        self.scheduler.abort(seq)

    # -- running -----------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[Sequence]:
        """Launch the next step and resolve the one in flight; return the sequences that got a
        token (a sequence is done when ``seq.is_done``). With ``async_scheduling`` the next step
        is launched before the previous one's tokens are read, so the host prepares step n+1
        while the device runs step n; a step whose rows read their generated tokens (penalties)
        waits for them first."""
        updated: list[Sequence] = []
        prev, self._in_flight = self._in_flight, None
        if prev is not None and not self._can_overlap():
            updated += self._resolve(prev)
            prev = None
        handle = self._launch_next(prev) if self.scheduler.has_unfinished() else None
        if prev is not None:
            updated += self._resolve(prev)
        self._in_flight = handle
        return updated

    def _can_overlap(self) -> bool:
        return self.config.async_scheduling and not any(s.params.needs_history for s in self.scheduler.running)

    def abort_all(self) -> list[Sequence]:
        """Drop the step in flight and every queued sequence, freeing their pages (after an
        error, so that the engine stays usable); return the sequences dropped."""
        return self._abort([*self.scheduler.running, *self.scheduler.waiting])

    def abort_running(self) -> list[Sequence]:
        """After a failed step: drop the step in flight and the sequences it may have touched
        (running ones, and preempted ones whose last token was in flight); the rest stay queued."""
        return self._abort([*self.scheduler.running, *(s for s in self.scheduler.waiting if s.num_pending)])

    def _abort(self, seqs: list[Sequence]) -> list[Sequence]:
        self._in_flight = None
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def run(self, seqs: list[Sequence], progress: bool = False,
            on_step: Callable[[list[Sequence]], None] | None = None) -> None:
        """Step until every queued sequence is done. On any error (Ctrl-C included) the queue
        is dropped and its pages freed, so the engine stays usable. ``on_step`` gets each step's
        updated sequences (stop strings, streamers and profilers hook in there)."""
        bar = tqdm(total=len(seqs), disable=not progress, unit="req", desc="hf_cb")
        start, generated_before = time.perf_counter(), self.num_generated_tokens
        try:
            while self.has_unfinished():
                updated = self.step()
                if on_step is not None:
                    on_step(updated)
                done = sum(s.is_done for s in updated)
                if done:
                    rate = (self.num_generated_tokens - generated_before) / (time.perf_counter() - start)
                    bar.set_postfix(tok_s=f"{rate:.0f}", refresh=False)
                    bar.update(done)
        except BaseException:
            self.abort_all()
            raise
        finally:
            bar.close()
            freeze_heap()  # what this run compiled is long-lived too

    def _launch_next(self, prev: StepHandle | None) -> StepHandle | None:
        """Schedule and launch the next step (None when nothing can run until ``prev`` resolves)."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if prev is None:
                raise RuntimeError("hf_cb: no request could be scheduled (page pool too small?)")
            return None
        handle = self.runner.launch(batch, prev)
        self.scheduler.on_launch(batch)
        self.stats.steps += 1
        self.stats.decode_steps += batch.is_decode
        self.stats.host_s += time.perf_counter() - start
        return handle

    def _resolve(self, handle: StepHandle) -> list[Sequence]:
        start = time.perf_counter()
        tokens, logprobs = self.runner.wait(handle)
        waited = time.perf_counter()
        updated = self.scheduler.resolve(handle.batch, tokens, logprobs)
        self.num_generated_tokens += len(tokens)
        self.stats.wait_s += waited - start
        self.stats.host_s += time.perf_counter() - waited
        return updated

    def release(self) -> None:
        """Give the model back its attention implementation; drop the pages."""
        self.abort_all()
        self._detach()
        self.cache.layers.clear()

    def _detach(self) -> None:
        """Take hf_cb's hooks and attention implementation off the model."""
        for hook in self._step_hooks:
            hook.remove()
        self.model.set_attn_implementation(self._original_attn)
