"""`PagedCache`: the K/V pages of every layer, as a Transformers `Cache`.

Each layer holds a key and a value tensor of ``[num_pages + 1, page_size, kv_heads, head_dim]``
(``NHD``) or ``[num_pages + 1, kv_heads, page_size, head_dim]`` (``HND``, where each head's
tokens of a page are contiguous; the backend picks), in the model's dtype or, with
``kv_cache_dtype="fp8"``, float8 e4m3 (`to_cache_dtype`). The extra last page belongs to no
sequence: padded rows of a captured CUDA graph write there. The model calls ``update(key, value, layer_idx)`` before its
attention function; inside an engine step ``update`` checks the K/V's shape and returns them as
they came, and the ``"hf_cb"`` attention function writes them into the layer's pages and attends
over those in one op (`paged_attention`), which keeps the write before the read in a compiled
forward.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from hf_cb.attention.context import in_step

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

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, is_sliding: bool, page_size: int, num_kv_heads: int):
        super().__init__()
        self.keys, self.values = keys, values
        self.is_sliding = is_sliding
        self.page_size, self.num_kv_heads, self.head_dim = page_size, num_kv_heads, keys.shape[3]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Pages are allocated up front; nothing to do."""

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[1] != self.num_kv_heads or key_states.shape[3] != self.head_dim:
            raise ValueError(
                f"the model produced K/V of {key_states.shape[1]} heads x {key_states.shape[3]}, "
                f"the paged cache holds {self.num_kv_heads} x {self.head_dim}"
            )
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return (self.keys.shape[0] - 1) * self.page_size

    def reset(self) -> None:
        """Pages are owned by the page manager; a reset leaves them to it."""


class PagedCache(Cache):
    """The paged KV cache of an hf_cb engine; usable only inside an engine step."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        sliding_layers: list[bool] | None = None,
        layout: Literal["NHD", "HND"] = "NHD",
    ):
        if layout not in ("NHD", "HND"):
            raise ValueError(f"unknown KV layout {layout!r} (NHD or HND)")
        sliding_layers = sliding_layers or [False] * num_layers
        page = (page_size, num_kv_heads) if layout == "NHD" else (num_kv_heads, page_size)
        shape = (num_pages + 1, *page, head_dim)
        layers = [
            PagedLayer(
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
                sliding_layers[i],
                page_size,
                num_kv_heads,
            )
            for i in range(num_layers)
        ]
        super().__init__(layers=layers)
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        self.layout = layout
        self.scratch_page = num_pages

    def token_major(self, pages: torch.Tensor) -> torch.Tensor:
        """A layer's ``keys`` or ``values`` as ``[num_pages + 1, page_size, kv_heads, head_dim]``
        (a view, whatever the layout)."""
        return pages if self.layout == "NHD" else pages.transpose(1, 2)

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * page_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not in_step():
            raise RuntimeError("PagedCache is written only inside an hf_cb engine step")
        return self.layers[layer_idx].update(key_states, value_states)
