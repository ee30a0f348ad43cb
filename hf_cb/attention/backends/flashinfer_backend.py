"""The FlashInfer attention backend (CUDA, fp16/bf16).

Single-token rows (decode rows, which the scheduler puts first) run
`BatchDecodeWithPagedKVCacheWrapper` (over fp8 pages: XQA, `xqa_decode`); multi-token rows run
`BatchPrefillWithPagedKVCacheWrapper` (causal), so a mixed step launches both kernels per layer, each into its slice of the output. Each distinct kind of layer (sliding window,
soft-cap, softmax scale) gets its own pair of wrappers, planned once per step from int32 index
arrays staged in pinned host buffers, so `plan()` never reads device memory. New K/V go into the
pages with one `append_paged_kv_cache` launch per layer. The pages' layout (`kv_layout`) is the
backend's choice, as the kernels read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hf_cb.attention.backends.xqa_decode import WORKSPACE_BYTES as XQA_WORKSPACE_BYTES
from hf_cb.attention.backends.xqa_decode import XQADecode
from hf_cb.core.staging import Staging
from hf_cb.manager import PageTable
from hf_cb.paged_cache import FP8

WORKSPACE_BYTES = 128 << 20
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)

Kind = tuple  # (sliding_window, softcap, scaling)


def graph_split_kv(batch_size: int, num_kv_heads: int, num_sms: int, requested: bool | None = None) -> bool:
    """Whether a tensor-core decode graph of ``batch_size`` rows lets FlashInfer split each row's
    KV. In a graph the planner always launches the merge kernel, but it splits only up to about
    two CTAs per SM in all: once the rows alone give every SM a CTA, a split adds little work
    to spread and the merge still costs a launch and a pass over the output per layer."""
    if requested is not None:
        return requested
    return batch_size * num_kv_heads <= num_sms


def unsupported_reason(dtype: torch.dtype, head_dim: int) -> str | None:
    """Why FlashInfer cannot serve this model, or None."""
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return "FlashInfer is not installed (pip install 'hf_cb[flashinfer]')"
    if dtype not in SUPPORTED_DTYPES:
        return f"FlashInfer has no {dtype} attention kernels (fp16 and bf16 only)"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"FlashInfer has no kernels for head_dim {head_dim} (64, 128 and 256 only)"
    return None


class FlashInferBackend:
    def __init__(
        self,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_num_seqs: int,
        max_num_tokens: int,
        max_num_page_ids: int,
        prefill_backend: str = "auto",
        decode_tensor_cores: bool | None = None,
        decode_split_kv: bool | None = None,
        kv_layout: str = "NHD",
        kv_dtype: torch.dtype | None = None,
        max_pages_per_seq: int | None = None,
    ):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.page_size, self.dtype, self.device = page_size, dtype, device
        self.kv_dtype = kv_dtype or dtype
        fp8 = self.kv_dtype == FP8
        if fp8 and prefill_backend == "fa3":
            raise ValueError("FlashInfer's fa3 kernels do not read fp8 pages with 16-bit queries: use "
                             "prefill_backend='fa2' or 'auto' with kv_cache_dtype='fp8'")
        # fa3 measured faster than fa2 on Hopper; its prebuilt kernels are bf16 only.
        if prefill_backend == "auto":
            fa3_ok = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] == 9 and not fp8
            prefill_backend = "fa3" if fa3_ok else "fa2"
        self.prefill_backend = prefill_backend
        # Tensor-core decode (FlashInfer's prefill kernels) measured faster for GQA groups of 2
        # and 4 on an H200 (benchmarks/attention_kernels.py; docs/performance.md).
        if decode_tensor_cores is None:
            decode_tensor_cores = num_heads // num_kv_heads >= 2
        self.use_tensor_cores = decode_tensor_cores
        self.decode_split_kv = decode_split_kv
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.kv_layout = kv_layout  # "NHD" or "HND": how the pages are laid out
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        i32 = torch.int32
        self.staging = Staging(
            device,
            {
                "qo_indptr": (max_num_seqs + 1, i32),
                "kv_indptr": (max_num_seqs + 1, i32),
                "kv_indices": (max_num_page_ids, i32),
                "kv_last_page_len": (max_num_seqs, i32),
                "token_rows": (max_num_tokens, i32),
                "positions": (max_num_tokens, i32),
                "prefill_qo_indptr": (max_num_seqs + 1, i32),
                "prefill_kv_indptr": (max_num_seqs + 1, i32),
            },
        )
        self.new_kinds = False  # set when a step met a kind of layer no earlier plan() covered
        self._prefill: dict[Kind, object] = {}
        self._decode: dict[Kind, object] = {}
        if fp8 and max_pages_per_seq is None:
            raise ValueError("fp8 pages need max_pages_per_seq: the width of XQA's page tables")
        # fp8 pages: decode rows run XQA (eager steps here, graphs their own over this workspace).
        self.xqa_workspace = torch.zeros(XQA_WORKSPACE_BYTES, dtype=torch.uint8, device=device) if fp8 else None
        self.xqa = self.new_xqa(max_num_seqs, max_pages_per_seq) if fp8 else None

    def new_xqa(self, max_rows: int, max_pages_per_seq: int) -> XQADecode:
        return XQADecode(self.device, max_rows, max_pages_per_seq, self.page_size, self.kv_layout, self.xqa_workspace)

    def plan(self, table: PageTable) -> "FlashInferStep":
        num_decode, arrays = step_arrays(table)
        if self.xqa is not None and num_decode:
            n = num_decode
            self.xqa.stage(table.kv_indptr[: n + 1], table.kv_indices, table.kv_last_page_len[:n])
        staged = {name: self.staging.put(name, a) for name, a in arrays.items()}
        host = {name: pair[0] for name, pair in staged.items()}
        dev = {name: pair[1] for name, pair in staged.items()}
        step = FlashInferStep(self, split_parts(table, num_decode, host, dev), dev)
        for kind in {**self._decode, **self._prefill}:
            step.wrappers(kind)
        return step

    def plan_decode(self, wrapper, kind: Kind, kv_indptr, kv_indices, kv_last_page_len,
                    graph_rows: int | None = None) -> None:
        """Plan a decode wrapper for one kind of layer; ``graph_rows``: the rows of the CUDA
        graph it serves (None: eager, where the planner splits the KV only when it pays)."""
        options = self._options(kind)
        if graph_rows is not None and self.use_tensor_cores:
            split = graph_split_kv(graph_rows, self.num_kv_heads, self.num_sms, self.decode_split_kv)
            options["disable_split_kv"] = not split
        wrapper.plan(kv_indptr, kv_indices, kv_last_page_len, *self._shape(), **options)

    def plan_prefill(self, wrapper, kind: Kind, qo_indptr, kv_indptr, kv_indices, kv_last_page_len) -> None:
        """Plan a causal prefill wrapper for one kind of layer."""
        wrapper.plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, *self._shape(), causal=True,
                     **self._options(kind))

    def _shape(self) -> tuple[int, int, int, int]:
        return self.num_heads, self.num_kv_heads, self.head_dim, self.page_size

    def _options(self, kind: Kind) -> dict:
        sliding_window, softcap, scaling = kind
        return dict(
            window_left=-1 if sliding_window is None else sliding_window - 1,
            logits_soft_cap=softcap,
            sm_scale=scaling,
            q_data_type=self.dtype,
            kv_data_type=self.kv_dtype,
            non_blocking=True,
        )

    def wrappers_of(self, is_decode: bool) -> dict:
        return self._decode if is_decode else self._prefill

    def new_wrapper(self, is_decode: bool):
        import flashinfer

        if is_decode:
            return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, self.kv_layout, use_tensor_cores=self.use_tensor_cores
            )
        return flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, self.kv_layout,
                                                              backend=self.prefill_backend)


def step_arrays(table: PageTable) -> tuple[int, dict[str, np.ndarray]]:
    """The step's int32 index arrays, and how many leading rows are single-token (decode) rows.
    A mixed step also gets its prefill rows' indptrs, rebased to start at 0."""
    qo_lens = np.diff(table.qo_indptr)
    single = qo_lens == 1
    num_decode = len(qo_lens) if single.all() else int(np.argmin(single))
    arrays = {
        "qo_indptr": table.qo_indptr,
        "kv_indptr": table.kv_indptr,
        "kv_indices": table.kv_indices,
        "kv_last_page_len": table.kv_last_page_len,
        "token_rows": table.token_rows,
        "positions": table.positions.astype(np.int32),
    }
    if 0 < num_decode < len(qo_lens):
        arrays["prefill_qo_indptr"] = table.qo_indptr[num_decode:] - table.qo_indptr[num_decode]
        arrays["prefill_kv_indptr"] = table.kv_indptr[num_decode:] - table.kv_indptr[num_decode]
    return num_decode, arrays


@dataclass
class Part:
    """Rows of a step run by one kernel: pinned host indptrs and last-page lengths (read by
    `plan()` on the host), page ids on the device, and the part's slice of the step's tokens."""

    is_decode: bool
    tokens: slice
    qo_indptr: torch.Tensor | None
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor


def split_parts(table: PageTable, num_decode: int, host: dict, dev: dict) -> list[Part]:
    """A step's rows as kernel parts. The scheduler puts single-token rows first; they run on
    the decode kernel, which reads each row's KV once, while the prefill kernel pads a one-token
    row to a whole query tile (measured 4x slower on mixed W3 steps)."""
    num_rows = len(table.qo_indptr) - 1
    if num_decode == num_rows:
        return [Part(True, slice(None), None, host["kv_indptr"], dev["kv_indices"], host["kv_last_page_len"])]
    if num_decode == 0:
        return [Part(False, slice(None), host["qo_indptr"], host["kv_indptr"], dev["kv_indices"],
                     host["kv_last_page_len"])]
    first_page = int(table.kv_indptr[num_decode])
    return [
        Part(True, slice(0, num_decode), None, host["kv_indptr"][: num_decode + 1], dev["kv_indices"],
             host["kv_last_page_len"][:num_decode]),
        Part(False, slice(num_decode, None), host["prefill_qo_indptr"], host["prefill_kv_indptr"],
             dev["kv_indices"][first_page:], host["kv_last_page_len"][num_decode:]),
    ]


class FlashInferStep:
    """One planned step. A kind of layer not seen before is planned on first use (and from
    then on at every `plan`)."""

    def __init__(self, backend: FlashInferBackend, parts: list[Part], dev: dict):
        self.backend = backend
        self.parts = parts
        self.dev = dev  # int32 index arrays on the device, for the KV append
        self._planned: dict[Kind, list] = {}

    def wrappers(self, kind: Kind) -> list:
        """The kind's wrappers, one per part, planned for this step."""
        planned = self._planned.get(kind)
        if planned is None:
            planned = self._planned[kind] = [self._plan(kind, part) for part in self.parts]
        return planned

    def _plan(self, kind: Kind, part: Part):
        b = self.backend
        if part.is_decode and b.xqa is not None:
            return b.xqa  # staged by `FlashInferBackend.plan`
        wrappers = b.wrappers_of(part.is_decode)
        if kind not in wrappers:
            wrappers[kind] = b.new_wrapper(part.is_decode)
            b.new_kinds = True
        wrapper = wrappers[kind]
        if part.is_decode:
            b.plan_decode(wrapper, kind, part.kv_indptr, part.kv_indices, part.kv_last_page_len)
        else:
            b.plan_prefill(wrapper, kind, part.qo_indptr, part.kv_indptr, part.kv_indices, part.kv_last_page_len)
        return wrapper

    def write_kv(self, k_cache, v_cache, key, value) -> None:
        import flashinfer

        d = self.dev
        flashinfer.append_paged_kv_cache(
            key, value, d["token_rows"], d["positions"], (k_cache, v_cache),
            d["kv_indices"], d["kv_indptr"], d["kv_last_page_len"], kv_layout=self.backend.kv_layout,
        )

    def attend(self, query, k_cache, v_cache, *, scaling, sliding_window, softcap, chunk=None,
               sinks=None) -> torch.Tensor:
        check_served(chunk, sinks)
        q, cache = query.contiguous(), (k_cache, v_cache)
        wrappers = self.wrappers((sliding_window, softcap, scaling))
        if len(wrappers) == 1:
            return run_attention(wrappers[0], q, cache, scaling, sliding_window)
        out = torch.empty_like(q)
        for wrapper, part in zip(wrappers, self.parts):
            run_attention(wrapper, q[part.tokens], cache, scaling, sliding_window, out=out[part.tokens])
        return out


def check_served(chunk: int | None, sinks: torch.Tensor | None) -> None:
    """The engine sends no such layer here (`AttentionShape.flashinfer_unsupported`)."""
    if chunk is not None or sinks is not None:
        raise NotImplementedError("hf_cb's FlashInfer backend serves neither chunked attention nor sinks yet")


def run_attention(wrapper, q, cache, scaling, sliding_window, out=None) -> torch.Tensor:
    """A planned FlashInfer wrapper's attention, or XQA's (which takes the kind's options here)."""
    if isinstance(wrapper, XQADecode):
        return wrapper.run(q, *cache, scaling=scaling, sliding_window=sliding_window, out=out)
    return wrapper.run(q, cache, out=out)
