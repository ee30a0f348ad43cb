"""Paged attention steps against a dense float64 reference; shared by the CPU and CUDA tests."""

from __future__ import annotations

import random

import torch

from hf_cb.manager import PageManager
from hf_cb.paged_cache import PagedCache


def run_case(
    backend,
    q_lens: list[int],
    kv_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: str,
    sliding_window: int | None = None,
    softcap: float | None = None,
    seed: int = 0,
) -> float:
    """Run one step (row b adds ``q_lens[b]`` tokens, ending at ``kv_lens[b]``) through
    ``backend`` with pages scattered over the pool; return the max relative error against a
    float64 dense reference. Also checks that the new K/V landed in their slots."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_pages = sum(-(-n // page_size) for n in kv_lens) + 8
    manager = PageManager(num_pages, page_size, len(kv_lens), max(-(-n // page_size) for n in kv_lens))
    rng.shuffle(manager._free_pages)  # pages at random places in the pool
    cache = PagedCache.uniform(1, num_pages, page_size, num_kv_heads, head_dim, dtype, torch.device(device),
                       layout=backend.kv_layout)
    k_cache, v_cache = cache.layers[0].keys, cache.layers[0].values
    k_slots, v_slots = cache.token_major(k_cache), cache.token_major(v_cache)  # [page, offset, head, dim]
    k_cache.normal_(generator=None)  # garbage in unused slots must not leak into the result
    v_cache.normal_(generator=None)

    keys = [torch.randn(n, num_kv_heads, head_dim, generator=gen, dtype=torch.float64) for n in kv_lens]
    values = [torch.randn(n, num_kv_heads, head_dim, generator=gen, dtype=torch.float64) for n in kv_lens]
    queries = [torch.randn(q, num_heads, head_dim, generator=gen, dtype=torch.float64) for q in q_lens]
    for s, n in enumerate(kv_lens):
        manager.allocate(s, n)
    # The cached prefix is already in the pages.
    cached = [n - q for n, q in zip(kv_lens, q_lens)]
    for s, c in enumerate(cached):
        pages = manager.pages_of(s)
        for pos in range(c):
            page, off = pages[pos // page_size], pos % page_size
            k_slots[page, off] = keys[s][pos].to(dtype)
            v_slots[page, off] = values[s][pos].to(dtype)

    table = manager.build(list(range(len(kv_lens))), cached, q_lens)
    step = backend.plan(table)
    new_k = torch.cat([k[c:] for k, c in zip(keys, cached)]).to(device=device, dtype=dtype)
    new_v = torch.cat([v[c:] for v, c in zip(values, cached)]).to(device=device, dtype=dtype)
    step.write_kv(k_cache, v_cache, new_k, new_v)
    flat_k = k_slots.reshape(-1, num_kv_heads, head_dim)
    slots = torch.as_tensor(table.slot_mapping, device=device)
    assert torch.equal(flat_k[slots], new_k), "new keys did not land in their slots"

    q = torch.cat(queries).to(device=device, dtype=dtype)
    scaling = head_dim**-0.5
    out = step.attend(q, k_cache, v_cache, scaling=scaling, sliding_window=sliding_window, softcap=softcap)
    ref = torch.cat(
        [
            dense_reference(qs, k.to(dtype).double(), v.to(dtype).double(), scaling, sliding_window, softcap)
            for qs, k, v in zip(queries, keys, values)
        ]
    )
    err = (out.double().cpu() - ref).norm() / ref.norm()
    return float(err)


def dense_reference(q, k, v, scaling, sliding_window=None, softcap=None):
    """Causal attention of the last ``len(q)`` positions over ``len(k)`` keys, in float64."""
    q_len, num_heads, _ = q.shape
    kv_len, num_kv_heads, _ = k.shape
    groups = num_heads // num_kv_heads
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    key = torch.arange(kv_len)[None]
    visible = key <= pos
    if sliding_window is not None:
        visible &= pos - key < sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
