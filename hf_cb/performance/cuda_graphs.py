"""Decode steps replayed from CUDA graphs: the performance layer, apart from the plain path.

One graph per bucketed batch size covers the model's own forward (the KV append and FlashInfer
decode attention of every layer) and greedy sampling. Before each replay the rows are padded to
the bucket (padded rows hold one token on the scratch page, so they read and write only there)
and the decode wrappers, built with ``use_cuda_graph=True`` over fixed index buffers, are
planned outside the graph.
"""

from __future__ import annotations

import numpy as np
import torch

from hf_cb.attention.backends.flashinfer_backend import FlashInferBackend, Kind, check_served, run_attention
from hf_cb.attention.forward import forward_step
from hf_cb.core.staging import Staging
from hf_cb.manager import PageTable
from hf_cb.paged_cache import PagedCache
from hf_cb.sampling.sampler import greedy_tokens


def graph_batch_sizes(max_batch: int) -> list[int]:
    """2, 4, 8, 16, then every 16 up to ``max_batch`` (which is always included). No graph of
    one row: a compiled forward specialises size 1 (a whole second compilation), and one row
    padded to two costs next to nothing in a step bound by reading the weights."""
    sizes = [b for b in (2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


def unowned(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t``'s memory that does not keep it allocated (vLLM's ``weak_ref_tensor``;
    torch's own CUDA graph trees rebuild their outputs the same way).

    Each graph's logits (``rows x vocab``) would otherwise stay allocated for the engine's life:
    8.5 GB for Llama's vocabulary over the graphs up to 1024 rows, which ran a llama-8b engine
    of 1536 rows out of memory. Unowned, the next capture reuses them, so the graphs share their
    memory. That is safe because a replay's outputs are used, in stream order, before the next
    replay (`ModelRunner.launch` samples from them at once)."""
    storage = t.untyped_storage()
    alias = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), t.device, storage.nbytes())
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(alias, t.storage_offset(), t.shape, t.stride())


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, forward, cache: PagedCache, backend: FlashInferBackend,
                 max_batch: int, max_num_page_ids: int, max_pages_per_seq: int):
        self.model, self.forward = model, forward  # forward: the model, maybe compiled
        self.cache, self.backend = cache, backend
        self.max_pages_per_seq = max_pages_per_seq  # the width of XQA's page tables (fp8 pages)
        self.sizes = graph_batch_sizes(max_batch)
        dev = backend.device
        B = self.sizes[-1]
        i32, i64 = torch.int32, torch.int64
        # Fixed buffers the graphs read; each step's values are copied in before replay.
        # 1-D, viewed as [1, b] per step as the eager path views its staging buffers: the same
        # strides and bases, so a compiled forward serves both without a recompilation.
        self.input_ids = torch.zeros(B, dtype=i64, device=dev)
        self.position_ids = torch.zeros(B, dtype=i64, device=dev)
        self.positions = torch.zeros(B, dtype=i32, device=dev)
        self.token_rows = torch.arange(B, dtype=i32, device=dev)
        self.logits_rows = torch.arange(B, dtype=i64, device=dev)  # the eager path's index type
        self.kv_indptr = torch.zeros(B + 1, dtype=i32, device=dev)
        self.kv_indices = torch.zeros(max_num_page_ids + B, dtype=i32, device=dev)
        self.kv_last_page_len = torch.zeros(B, dtype=i32, device=dev)
        self.staging = Staging(dev, {
            "input_ids": (B, i64), "positions": (B, i64),
            "kv_indptr": (B + 1, i32), "kv_indices": (max_num_page_ids + B, i32), "kv_last_page_len": (B, i32),
        }, into={"input_ids": self.input_ids, "positions": self.position_ids, "kv_indptr": self.kv_indptr,
                 "kv_indices": self.kv_indices, "kv_last_page_len": self.kv_last_page_len})
        self._mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}
        self.steps: dict[int, GraphDecodeStep] = {}
        self.pool = None

    def size_for(self, batch_size: int) -> int | None:
        return next((b for b in self.sizes if b >= batch_size), None)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every bucket, largest first so that smaller graphs reuse its memory pool."""
        side = torch.cuda.Stream()
        for b in reversed(self.sizes):
            step = self.steps[b] = GraphDecodeStep(self, b)
            self._stage(step, *self._dummy_rows(b))
            # Warm up on a side stream (lazy per-stream library state must not start inside a
            # capture); the eager run also finds the layer kinds and builds their wrappers.
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(step)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._forward(step)
                self.tokens[b] = greedy_tokens(logits)
            self.pool = graph.pool()
            self.graphs[b], self.logits[b] = graph, unowned(logits)
            del logits  # its memory goes back to the pool, for the next (smaller) capture
        torch.cuda.synchronize()

    def _dummy_rows(self, b: int):
        """Every row one token at position 0 of the scratch page."""
        scratch = self.cache.scratch_page
        return (np.zeros(b, np.int64), np.zeros(b, np.int64), np.arange(b + 1, dtype=np.int32),
                np.full(b, scratch, np.int32), np.ones(b, np.int32))

    def _forward(self, step: "GraphDecodeStep") -> torch.Tensor:
        b = step.batch_size
        return forward_step(self.forward, self.model, self.cache, step, self.input_ids[:b][None],
                            self.position_ids[:b][None], self._mask, self.logits_rows[:b])

    def _stage(self, step, input_ids, positions, kv_indptr, kv_indices, kv_last_page_len) -> None:
        """Copy a step's rows into the fixed buffers and plan the bucket's wrappers."""
        b = step.batch_size
        put = self.staging.put
        put("input_ids", input_ids)  # every array goes straight into its fixed buffer
        self.positions[:b].copy_(put("positions", positions)[1])  # into self.position_ids; int32 here
        step.host_indptr = put("kv_indptr", kv_indptr)[0]
        step.dev_indices = put("kv_indices", kv_indices)[1]  # the plan's copy into its buffer is then a no-op
        step.host_last = put("kv_last_page_len", kv_last_page_len)[0]
        if step.xqa is not None:
            step.xqa.stage(kv_indptr, kv_indices, kv_last_page_len)  # fp8 pages: XQA's table of its own
        for kind in step.wrappers:
            step.plan(kind)

    def prepare(self, b: int, table: PageTable, input_ids: np.ndarray) -> None:
        """Stage a decode step of ``table.num_rows`` rows into the fixed buffers of bucket ``b``
        (`size_for`) and plan."""
        pad = b - table.num_rows
        self._stage(
            self.steps[b],
            np.concatenate([input_ids, np.zeros(pad, np.int64)]),
            np.concatenate([table.positions, np.zeros(pad, np.int64)]),
            np.concatenate([table.kv_indptr, table.kv_indptr[-1] + np.arange(1, pad + 1, dtype=np.int32)]),
            np.concatenate([table.kv_indices, np.full(pad, self.cache.scratch_page, np.int32)]),
            np.concatenate([table.kv_last_page_len, np.ones(pad, np.int32)]),
        )

    def replay(self, size: int, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the bucket's graph; (greedy tokens, logits) of the real rows, valid until the
        next replay of any bucket (the buckets share their memory)."""
        self.graphs[size].replay()
        return self.tokens[size][:num_rows], self.logits[size][:num_rows]


class GraphDecodeStep:
    """The `AttentionStep` a decode graph was captured with: fixed buffers, one wrapper per kind."""

    def __init__(self, graphs: DecodeGraphs, batch_size: int):
        self.graphs, self.batch_size = graphs, batch_size
        self.wrappers: dict[Kind, object] = {}
        self.host_indptr = self.dev_indices = self.host_last = None
        backend = graphs.backend
        self.xqa = backend.new_xqa(batch_size, graphs.max_pages_per_seq) if backend.xqa is not None else None

    def plan(self, kind: Kind) -> None:
        self.graphs.backend.plan_decode(self.wrappers[kind], kind, self.host_indptr, self.dev_indices, self.host_last,
                                        graph_rows=self.batch_size)

    def write_kv(self, k_cache, v_cache, key, value) -> None:
        import flashinfer

        g, n = self.graphs, self.batch_size
        flashinfer.append_paged_kv_cache(
            key, value, g.token_rows[:n], g.positions[:n], (k_cache, v_cache),
            g.kv_indices, g.kv_indptr[: n + 1], g.kv_last_page_len[:n], kv_layout=g.backend.kv_layout,
        )

    def attend(self, query, k_cache, v_cache, *, scaling, sliding_window, softcap, chunk=None,
               sinks=None) -> torch.Tensor:
        check_served(chunk, sinks)
        if self.xqa is not None:
            return run_attention(self.xqa, query.contiguous(), (k_cache, v_cache), scaling, sliding_window)
        kind = (sliding_window, softcap, scaling)
        wrapper = self.wrappers.get(kind)
        if wrapper is None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"hf_cb: layer kind {kind} first seen while capturing a CUDA graph")
            wrapper = self.wrappers[kind] = self._new_wrapper()
            self.plan(kind)
        return wrapper.run(query.contiguous(), (k_cache, v_cache))

    def _new_wrapper(self):
        import flashinfer

        g, n, b = self.graphs, self.batch_size, self.graphs.backend
        return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            b.workspace, b.kv_layout, use_cuda_graph=True, use_tensor_cores=b.use_tensor_cores,
            paged_kv_indptr_buffer=g.kv_indptr[: n + 1],
            paged_kv_indices_buffer=g.kv_indices,
            paged_kv_last_page_len_buffer=g.kv_last_page_len[:n],
        )
