"""Decode attention over KV chunks: each row's pages split into ``chunks`` pseudo-rows, attended
apart and merged by their log-sum-exp (the split-KV of FlashAttention's decoding, done outside
the kernel).

Why: inside a CUDA graph FlashInfer's planner splits a row's KV only up to about two CTAs per SM
in all, so a graph of 32 rows of llama-1b runs 256 CTAs on 132 SMs and reads the KV at about
2.5 TB/s. Split into chunks, the same KV is read by ``chunks`` times as many CTAs. The host
builds the chunk table (`chunk_table`) before each replay; the graph copies each query to its
row's pseudo-rows, attends, and merges (`merge_chunks`).
"""

from __future__ import annotations

import numpy as np
import torch


def chunk_table(kv_indptr: np.ndarray, kv_indices: np.ndarray, kv_last_page_len: np.ndarray, chunks: int,
                page_size: int, empty_page: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The page table of ``chunks`` pseudo-rows per row (row r's chunk j is pseudo-row
    ``r * chunks + j``): contiguous runs of the row's pages, the longer runs first. A row with
    fewer pages than chunks leaves its last chunks empty; an empty chunk reads one token of
    ``empty_page`` and is flagged invalid, for the merge to ignore. Returns int32 ``kv_indptr``,
    ``kv_indices``, ``kv_last_page_len`` and the per-pseudo-row validity (int32, 0 or 1)."""
    pages = np.diff(kv_indptr).astype(np.int64)
    j = np.arange(chunks)
    sizes = pages[:, None] // chunks + (j[None, :] < (pages % chunks)[:, None])  # [rows, chunks]
    starts = kv_indptr[:-1, None] + np.cumsum(sizes, axis=1) - sizes
    empty = (sizes == 0).ravel()
    lengths = np.where(empty, 1, sizes.ravel())
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    offsets = np.arange(indptr[-1]) - np.repeat(indptr[:-1], lengths)
    source = np.minimum(np.repeat(starts.ravel(), lengths) + offsets, max(len(kv_indices) - 1, 0))
    indices = np.where(np.repeat(empty, lengths), empty_page, kv_indices[source]).astype(np.int32)
    last_chunk = (j[None, :] == np.minimum(pages, chunks)[:, None] - 1).ravel()
    last = np.where(last_chunk, np.repeat(kv_last_page_len, chunks), np.where(empty, 1, page_size))
    return indptr, indices, last.astype(np.int32), (~empty).astype(np.int32)


def merge_chunks_reference(out: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor, chunks: int) -> torch.Tensor:
    """`merge_chunks` in plain PyTorch (any device): ``out`` ``[R * chunks, H, D]``, ``lse``
    ``[R * chunks, H]`` in base 2 (FlashInfer's), ``valid`` ``[R * chunks]``; ``[R, H, D]``."""
    rows, heads, dim = out.shape[0] // chunks, out.shape[1], out.shape[2]
    lse = lse.float().masked_fill(valid[:, None] == 0, float("-inf")).view(rows, chunks, heads)
    weight = torch.exp2(lse - lse.amax(dim=1, keepdim=True))
    weight = weight / weight.sum(dim=1, keepdim=True)
    merged = (out.float().view(rows, chunks, heads, dim) * weight[..., None]).sum(dim=1)
    return merged.to(out.dtype)


def merge_chunks(out: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor, chunks: int) -> torch.Tensor:
    """Merge each row's ``chunks`` partial attentions by their log-sum-exp: one Triton kernel on
    CUDA (a graph step launches it once per layer), `merge_chunks_reference` elsewhere."""
    if not out.is_cuda:
        return merge_chunks_reference(out, lse, valid, chunks)
    from ._kv_chunks_triton import merge_chunks_triton

    return merge_chunks_triton(out, lse, valid, chunks)
