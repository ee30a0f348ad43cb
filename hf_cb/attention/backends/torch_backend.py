"""The pure-PyTorch attention backend: runs on any device and dtype.

Each step gathers, once, the index tensors that lay the packed step out as a padded batch
(``[rows, longest query]`` queries, ``[rows, longest context]`` key slots); each layer then
gathers its K/V from the pages and runs SDPA with a per-row causal mask.
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
        self.q_index = (qo_indptr[:-1, None] + i).clamp(max=table.num_tokens - 1)
        self.q_pos = (kv_lens - q_lens)[:, None] + i  # position of each query in its sequence
        j = torch.arange(max_kv, device=device)
        page_idx = (kv_indptr[:-1, None] + j // page_size).clamp(max=len(table.kv_indices) - 1)
        self.kv_slots = kv_indices[page_idx] * page_size + j % page_size  # [B, Lmax]
        self.j = j
        # A padding query sees key 0 so that its softmax stays finite; its output is dropped.
        causal = j <= self.q_pos[..., None]
        causal &= valid_q[..., None]
        causal[..., 0] |= ~valid_q
        self._masks = {None: causal}
        self.out_index = valid_q.flatten().nonzero().squeeze(1)  # row-major = token order
        self.slot_mapping = dev(table.slot_mapping)

    def _mask(self, sliding_window: int | None) -> torch.Tensor:
        mask = self._masks.get(sliding_window)
        if mask is None:
            in_window = self.q_pos[..., None] - self.j < sliding_window
            mask = self._masks[sliding_window] = self._masks[None] & in_window
            mask[..., 0] |= ~mask.any(dim=-1)
        return mask

    def write_kv(self, k_cache, v_cache, key, value) -> None:
        for cache, new in ((k_cache, key), (v_cache, value)):
            _slots(cache).index_copy_(0, self.slot_mapping, _raw(new))

    def attend(self, query, k_cache, v_cache, *, scaling, sliding_window, softcap) -> torch.Tensor:
        num_heads, head_dim = query.shape[1:]
        q = query[self.q_index].transpose(1, 2)  # [B, H, Qmax, D]
        k = self._gather(k_cache, query.dtype)  # [B, Hkv, Lmax, D]
        v = self._gather(v_cache, query.dtype)
        mask = self._mask(sliding_window)[:, None]  # [B, 1, Qmax, Lmax]
        if softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        else:
            out = _softcapped_attention(q, k, v, mask, scaling, softcap)
        out = out.transpose(1, 2).reshape(-1, num_heads, head_dim)
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


def _softcapped_attention(q, k, v, mask, scaling, softcap):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1, dtype=torch.float32)
    return torch.matmul(scores.to(v.dtype), v)
