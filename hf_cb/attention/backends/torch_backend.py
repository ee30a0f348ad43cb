"""The pure-PyTorch attention backend: runs on any device and dtype, and every kind of layer
(sliding windows, chunks, soft-caps, sinks, per-layer head sizes, MLA's expanded contexts).

Each step gathers, once, the index tensors that lay the packed step out as a padded batch
(``[rows, longest query]`` queries, ``[rows, longest context]`` key slots); each layer then
gathers its K/V from the pages (or, for a ``context`` layer, from the context the model
expanded) and runs SDPA with a per-row causal mask, or the explicit softmax where a soft-cap or
sinks change it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_cb.manager import PageTable
from hf_cb.paged_cache import FP8


class TorchAttentionBackend:
    new_kinds = False  # every kind of layer is served by the same step (see FlashInferBackend)
    kv_layout = "NHD"  # the slot-major pages `write_kv` and `attend` index

    def __init__(self, page_size: int, device: torch.device):
        self.page_size = page_size
        self.device = device

    def plan(self, table: PageTable) -> "TorchAttentionStep":
        return TorchAttentionStep(table, self.page_size, self.device)


class TorchAttentionStep:
    def __init__(self, table: PageTable, page_size: int, device: torch.device):
        def dev(a):
            return torch.from_numpy(a).to(device=device, dtype=torch.int64)

        qo_indptr, kv_indptr, kv_indices = dev(table.qo_indptr), dev(table.kv_indptr), dev(table.kv_indices)
        kv_lens = dev(table.kv_lens)
        q_lens = qo_indptr[1:] - qo_indptr[:-1]
        max_q = int((table.qo_indptr[1:] - table.qo_indptr[:-1]).max())
        max_kv = int(table.kv_lens.max())

        i = torch.arange(max_q, device=device)
        valid_q = i < q_lens[:, None]  # [B, Qmax]
        self.valid_q = valid_q
        self.q_index = (qo_indptr[:-1, None] + i).clamp(max=table.num_tokens - 1)
        self.q_pos = (kv_lens - q_lens)[:, None] + i  # position of each query in its sequence
        j = torch.arange(max_kv, device=device)
        page_idx = (kv_indptr[:-1, None] + j // page_size).clamp(max=len(table.kv_indices) - 1)
        self.kv_slots = kv_indices[page_idx] * page_size + j % page_size  # [B, Lmax]
        self.j = j
        # Each row's context, rows one after another (`gather`), and where a row's key j sits in it.
        valid_kv = j < kv_lens[:, None]
        self.context_slots = self.kv_slots[valid_kv]
        ctx_starts = torch.cumsum(kv_lens, 0) - kv_lens
        self.context_index = (ctx_starts[:, None] + j).clamp(max=max(int(table.kv_lens.sum()) - 1, 0))
        self._masks: dict[tuple, torch.Tensor] = {}
        self.out_index = valid_q.flatten().nonzero().squeeze(1)  # row-major = token order
        self.slot_mapping = dev(table.slot_mapping)

    def _mask(self, window: int | None, chunk: int | None) -> torch.Tensor:
        """``[B, Qmax, Lmax]``: which keys each query sees. A padding query sees key 0, so that
        its softmax stays finite; its output is dropped."""
        mask = self._masks.get((window, chunk))
        if mask is None:
            q_pos, j = self.q_pos[..., None], self.j
            mask = (j <= q_pos) & self.valid_q[..., None]
            if window is not None:
                mask &= q_pos - j < window
            if chunk is not None:  # the query's own chunk: [q_pos // chunk * chunk, q_pos]
                mask &= j >= q_pos // chunk * chunk
            mask[..., 0] |= ~mask.any(dim=-1)
            self._masks[(window, chunk)] = mask
        return mask

    def write_kv(self, k_cache, v_cache, key, value) -> None:
        for cache, new in ((k_cache, key), (v_cache, value)):
            _slots(cache).index_copy_(0, self.slot_mapping, _raw(new))

    def attend(self, query, k_cache, v_cache, *, scaling, sliding_window, softcap, chunk=None,
               sinks=None) -> torch.Tensor:
        k = self._gather(k_cache, query.dtype)  # [B, Hkv, Lmax, D]
        v = self._gather(v_cache, query.dtype)
        return self._attend(query, k, v, scaling, sliding_window, softcap, chunk, sinks)

    def gather(self, k_cache, v_cache) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(_slots(c)[self.context_slots].view(c.dtype) for c in (k_cache, v_cache))

    def attend_context(self, query, key, value, *, scaling, sliding_window, softcap, chunk=None,
                       sinks=None) -> torch.Tensor:
        k = key[self.context_index].to(query.dtype).transpose(1, 2)  # [C, H, D] -> [B, H, Lmax, D]
        v = value[self.context_index].to(query.dtype).transpose(1, 2)
        return self._attend(query, k, v, scaling, sliding_window, softcap, chunk, sinks)

    def _attend(self, query, k, v, scaling, window, softcap, chunk, sinks) -> torch.Tensor:
        num_heads = query.shape[1]
        q = query[self.q_index].transpose(1, 2)  # [B, H, Qmax, D]
        mask = self._mask(window, chunk)[:, None]  # [B, 1, Qmax, Lmax]
        if softcap is None and sinks is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        else:
            out = _explicit_attention(q, k, v, mask, scaling, softcap, sinks)
        out = out.transpose(1, 2).reshape(-1, num_heads, v.shape[-1])
        return out[self.out_index]

    def _gather(self, cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Each row's keys (or values) from the pages, ``[B, Hkv, Lmax, D]`` in ``dtype``."""
        return _slots(cache)[self.kv_slots].view(cache.dtype).to(dtype).transpose(1, 2)


def _slots(cache: torch.Tensor) -> torch.Tensor:
    """A layer's pages as ``[slots, Hkv, D]``; fp8 pages as bytes (indexing kernels on some
    devices do not take float8)."""
    return _raw(cache).view(-1, *cache.shape[2:])


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


def _explicit_attention(q, k, v, mask, scaling, softcap, sinks):
    """The softmax written out, as the models' eager attention computes it: a soft-cap on the
    scores (Gemma 2), and per-head sink logits as one more column of the softmax, then dropped
    (gpt-oss)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        column = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, column], dim=-1)
    probs = scores.softmax(dim=-1, dtype=torch.float32)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)
