"""`PagedCache`: the K/V pages of every layer, as a Transformers `Cache`.

Each layer holds a key and a value tensor of ``[num_pages + 1, page_size, heads, dim]`` (``NHD``)
or ``[num_pages + 1, heads, page_size, dim]`` (``HND``, where each head's tokens of a page are
contiguous; the backend picks), shaped as the layer gives its K/V to the cache (`LayerSpec`: the
layers may differ), in the model's dtype or, with ``kv_cache_dtype="fp8"``, float8 e4m3
(`to_cache_dtype`). The extra last page belongs to no sequence: padded rows of a captured CUDA
graph write there.

The model calls ``update(key, value, layer_idx)`` before its attention function. Inside an engine
step ``update`` checks the K/V's shape and returns them as they came, and the ``"hf_cb"`` attention
function writes them into the layer's pages and attends over those in one op
(`attention.ops.paged_attention`), which keeps the write before the read in a compiled forward.
A ``context`` layer (MLA, which expands what it cached) is the exception: its ``update`` writes
the new K/V into the pages itself and returns each sequence's whole context, gathered from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from hf_cb.attention.context import current_step, in_step
from hf_cb.attention.shape import LayerSpec, uniform_shape

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: e4m3fn has no infinity, and a cast past it gives NaN


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pages' dtype for `EngineConfig.kv_cache_dtype` ``name``."""
    return FP8 if name in ("fp8", "fp8_e4m3") else model_dtype


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the pages store it: fp8 with a scale of 1 saturates at +-448, as vLLM's cast does."""
    if x.dtype == dtype:
        return x
    return (x.clamp(-FP8_MAX, FP8_MAX) if dtype == FP8 else x).to(dtype)


class PagedLayer(CacheLayerMixin):
    """One layer's pages. Sequence lengths live in the page manager, not here."""

    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spec: LayerSpec, page_size: int):
        super().__init__()
        self.keys, self.values, self.spec, self.page_size = keys, values, spec, page_size
        self.is_sliding = spec.window is not None or spec.chunk is not None
        self.num_kv_heads, self.head_dim = spec.kv_heads, spec.k_dim
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Pages are allocated up front; nothing to do."""

    def update(self, key_states, value_states, *args, **kwargs):
        """Inside a step: the new K/V as they came (the attention op writes them), or for a
        ``context`` layer, each sequence's whole context after writing them here."""
        spec = self.spec
        given = (key_states.shape[1], key_states.shape[3], value_states.shape[1], value_states.shape[3])
        if given != (spec.kv_heads, spec.k_dim, spec.v_heads, spec.v_dim):
            raise ValueError(
                f"the model produced K/V of {given[0]} heads x {given[1]} and {given[2]} heads x {given[3]}, the "
                f"paged cache holds {spec.kv_heads} x {spec.k_dim} and {spec.v_heads} x {spec.v_dim}"
            )
        if not spec.context:
            return key_states, value_states
        step = current_step()[1]
        # [1, heads, T, D] -> [T, heads, D], in the pages' dtype; the context back as the model's.
        step.write_kv(self.keys, self.values, *(to_cache_dtype(x[0].transpose(0, 1), self.keys.dtype)
                                                 for x in (key_states, value_states)))
        keys, values = step.gather(self.keys, self.values)
        return (keys.to(key_states.dtype).transpose(0, 1)[None], values.to(value_states.dtype).transpose(0, 1)[None])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return (self.keys.shape[0] - 1) * self.page_size

    def reset(self) -> None:
        """Pages are owned by the page manager; a reset leaves them to it."""


class PagedCache(Cache):
    """The paged KV cache of an hf_cb engine, one `PagedLayer` per `LayerSpec`; usable only
    inside an engine step."""

    def __init__(self, specs: Sequence[LayerSpec], num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device, layout: Literal["NHD", "HND"] = "NHD"):
        if layout not in ("NHD", "HND"):
            raise ValueError(f"unknown KV layout {layout!r} (NHD or HND)")

        def pages(heads: int, dim: int) -> torch.Tensor:
            page = (page_size, heads) if layout == "NHD" else (heads, page_size)
            return torch.zeros((num_pages + 1, *page, dim), dtype=dtype, device=device)

        layers = [PagedLayer(pages(s.kv_heads, s.k_dim), pages(s.v_heads, s.v_dim), s, page_size) for s in specs]
        super().__init__(layers=layers)
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        self.layout = layout
        self.scratch_page = num_pages

    @classmethod
    def uniform(cls, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device, sliding_windows: list[int | None] | None = None,
                layout: Literal["NHD", "HND"] = "NHD") -> PagedCache:
        """Every layer alike: ``num_kv_heads`` heads of ``head_dim`` for keys and values."""
        shape = uniform_shape(num_layers, num_kv_heads, num_kv_heads, head_dim, sliding_windows)
        return cls(shape.layers, num_pages, page_size, dtype, device, layout)

    def token_major(self, pages: torch.Tensor) -> torch.Tensor:
        """A layer's ``keys`` or ``values`` as ``[num_pages + 1, page_size, heads, dim]`` (a view,
        whatever the layout)."""
        return pages if self.layout == "NHD" else pages.transpose(1, 2)

    @staticmethod
    def bytes_per_page(specs: Sequence[LayerSpec], page_size: int, dtype: torch.dtype) -> int:
        return page_size * sum(s.page_elems() for s in specs) * torch.empty(0, dtype=dtype).element_size()

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not in_step():
            raise RuntimeError("PagedCache is written only inside an hf_cb engine step")
        return self.layers[layer_idx].update(key_states, value_states)
