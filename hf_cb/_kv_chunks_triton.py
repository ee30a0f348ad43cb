"""The Triton kernel of `kv_chunks.merge_chunks` (imported only on CUDA)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(out_ptr, lse_ptr, valid_ptr, merged_ptr, HEADS: tl.constexpr, CHUNKS: tl.constexpr,
                  DIM: tl.constexpr):
    # One program per (row, head): weigh the row's chunks by 2^(lse - max lse), invalid ones by 0.
    row, head = tl.program_id(0), tl.program_id(1)
    chunk = row * CHUNKS + tl.arange(0, CHUNKS)
    dim = tl.arange(0, DIM)
    lse = tl.load(lse_ptr + chunk * HEADS + head)
    lse = tl.where(tl.load(valid_ptr + chunk) != 0, lse, float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))
    part = tl.load(out_ptr + (chunk[:, None] * HEADS + head) * DIM + dim[None, :]).to(tl.float32)
    merged = tl.sum(part * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(merged_ptr + (row * HEADS + head) * DIM + dim, merged.to(merged_ptr.dtype.element_ty))


def merge_chunks_triton(out: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor, chunks: int) -> torch.Tensor:
    """``out`` ``[R * chunks, H, D]`` (contiguous), ``lse`` ``[R * chunks, H]`` float32,
    ``valid`` ``[R * chunks]`` int32; ``chunks`` and D powers of two. ``[R, H, D]``."""
    rows, heads, dim = out.shape[0] // chunks, out.shape[1], out.shape[2]
    merged = out.new_empty((rows, heads, dim))
    _merge_kernel[(rows, heads)](out, lse, valid, merged, HEADS=heads, CHUNKS=chunks, DIM=dim, num_warps=1)
    return merged
