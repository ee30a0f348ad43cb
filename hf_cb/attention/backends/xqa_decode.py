"""Decode attention over fp8 pages: TensorRT-LLM's XQA kernel, as FlashInfer ships it.

With ``kv_cache_dtype="fp8"`` FlashInfer's own decode kernels read the pages slower than they
read bf16 ones (llama-1b, a W1 step replayed from a graph on an H200: 0.196 ms a layer against
0.152), while XQA's Hopper kernel for fp8 pages takes 0.095 (3.1 TB/s), and 0.146 against
0.296 on llama-8b's W4 (`benchmarks/decode_kernels.py --kv-dtype fp8`; docs/performance.md). XQA reads each
row's pages from a dense ``[rows, pages]`` table and the row's length; both are built on the
host from the step's CSR arrays and copied into fixed device buffers, so a CUDA graph replays
it as it is. FlashInfer compiles the kernel on first use (about a minute, then cached).
"""

from __future__ import annotations

import numpy as np
import torch

from hf_cb.core.staging import Staging

# XQA's semaphores (the first 8 MiB, zero before first use; the kernel leaves them zero) and the
# partial results of rows split over several CTAs.
WORKSPACE_BYTES = 128 << 20
PAGE_SIZES = (16, 32, 64, 128)


def unsupported_reason(head_dim: int, page_size: int, softcap: float | None,
                       capability: tuple[int, int]) -> str | None:
    """Why fp8 pages cannot be read by XQA for this model and engine, or None."""
    if capability[0] not in (9, 10, 12):
        return f"kv_cache_dtype='fp8' on FlashInfer needs an sm90, sm100 or sm120 GPU (XQA), this one is sm{capability[0]}{capability[1]}"
    if page_size not in PAGE_SIZES:
        return f"kv_cache_dtype='fp8' needs page_size in {PAGE_SIZES} (XQA), got {page_size}"
    if head_dim % 16 or head_dim > 256:
        return f"kv_cache_dtype='fp8' needs a head_dim that is a multiple of 16 up to 256 (XQA), got {head_dim}"
    if softcap is not None:
        return "kv_cache_dtype='fp8' does not support attention logit soft-capping (XQA has none)"
    return None


def dense_page_table(kv_indptr: np.ndarray, kv_indices: np.ndarray, kv_last_page_len: np.ndarray,
                     page_size: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows' pages as int32 ``[rows, width]`` (a row's last page repeated past its end, never
    read) and their lengths in tokens, from the CSR arrays FlashInfer takes."""
    counts = np.diff(kv_indptr)
    columns = np.minimum(np.arange(width), np.maximum(counts, 1)[:, None] - 1)
    table = kv_indices[kv_indptr[:-1, None] + columns]
    lengths = (counts - 1) * page_size + kv_last_page_len
    return table.astype(np.int32, copy=False), lengths.astype(np.int32, copy=False)


class XQADecode:
    """Decode attention of up to ``max_rows`` single-token rows over fp8 pages."""

    def __init__(self, device: torch.device, max_rows: int, width: int, page_size: int, kv_layout: str,
                 workspace: torch.Tensor):
        self.width, self.page_size, self.kv_layout = width, page_size, kv_layout
        self.workspace = workspace
        self.staging = Staging(device, {"table": (max_rows * width, torch.int32), "lengths": (max_rows, torch.int32)})
        self.table = self.lengths = None

    def stage(self, kv_indptr: np.ndarray, kv_indices: np.ndarray, kv_last_page_len: np.ndarray) -> None:
        """Copy a step's rows (CSR, as planned for FlashInfer) into the device buffers."""
        table, lengths = dense_page_table(kv_indptr, kv_indices, kv_last_page_len, self.page_size, self.width)
        self.table = self.staging.put("table", table.reshape(-1))[1].view(-1, self.width)
        self.lengths = self.staging.put("lengths", lengths)[1].view(torch.uint32)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scaling: float,
            sliding_window: int | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the staged rows' queries ``q`` ``[rows, H, D]``."""
        from flashinfer.decode import xqa_batch_decode_with_kv_cache

        return xqa_batch_decode_with_kv_cache(
            q, (k_cache, v_cache), self.workspace, self.table, self.lengths, self.width * self.page_size,
            bmm1_scale=scaling, window_left=-1 if sliding_window is None else sliding_window - 1, out=out,
            kv_layout=self.kv_layout,
        )
