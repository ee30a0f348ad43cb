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

A layer that keeps a recurrent state (linear attention, state-space, convolution) holds it in a
slot pool (`attention.states`), bound to the step's sequences around each forward
(`PagedCache.bound`); a hybrid layer holds both pages and states; a layer with neither (an MLP
layer) is Transformers' `DummyLayer`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

try:
    from transformers.cache_utils import DummyLayer
except ImportError:  # Transformers < 5.23: a layer that caches nothing (an MLP layer) of our own

    class DummyLayer:
        is_compileable = True
        supports_early_init = False

        def reset(self) -> None: ...

from hf_cb.attention.context import current_step, in_step, note_update
from hf_cb.attention.shape import LayerSpec, StateSpec, uniform_shape
from hf_cb.attention.states import StateLayer

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
        # [B, heads, L, D] -> [B * L, heads, D], in the pages' dtype; the context back as the model's.
        step.write_kv(self.keys, self.values, *(to_cache_dtype(tokens_first(x), self.keys.dtype)
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


def tokens_first(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, L, D]`` as the step's tokens, row after row: ``[B * L, heads, D]`` (a view
    for one row)."""
    if x.shape[0] == 1:
        return x[0].transpose(0, 1)
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


class PagedStateLayer(StateLayer, PagedLayer):
    """A layer with both K/V pages and recurrent states (Falcon-H1's, Zamba's hybrid layers)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spec: LayerSpec, page_size: int,
                 state: StateSpec, num_slots: int, device: torch.device):
        PagedLayer.__init__(self, keys, values, spec, page_size)
        StateLayer.__init__(self, state, num_slots, device)

    def get_seq_length(self) -> int:
        return 0


class PagedCache(Cache):
    """The cache of an hf_cb engine: per layer, K/V pages (a `LayerSpec`), recurrent-state slots
    (a `StateSpec`), both, or neither; usable only inside an engine step."""

    def __init__(self, specs: Sequence[LayerSpec | None], num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device, layout: Literal["NHD", "HND"] = "NHD",
                 states: Sequence[StateSpec | None] = (), num_slots: int = 0):
        """``specs``: each layer's attention (None: it does not attend); ``states``: each layer's
        recurrent state (empty, or None where it keeps none), ``num_slots`` of each."""
        if layout not in ("NHD", "HND"):
            raise ValueError(f"unknown KV layout {layout!r} (NHD or HND)")

        def pages(heads: int, dim: int) -> torch.Tensor:
            page = (page_size, heads) if layout == "NHD" else (heads, page_size)
            return torch.zeros((num_pages + 1, *page, dim), dtype=dtype, device=device)

        def layer(spec: LayerSpec | None, state: StateSpec | None):
            if spec is None:
                return DummyLayer() if state is None else StateLayer(state, num_slots, device)
            keys, values = pages(spec.kv_heads, spec.k_dim), pages(spec.v_heads, spec.v_dim)
            if state is None:
                return PagedLayer(keys, values, spec, page_size)
            return PagedStateLayer(keys, values, spec, page_size, state, num_slots, device)

        states = tuple(states) or (None,) * len(specs)
        super().__init__(layers=[layer(spec, state) for spec, state in zip(specs, states)])
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        self.layout = layout
        self.scratch_page = num_pages
        self.state_layers = [la for la in self.layers if isinstance(la, StateLayer)]

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
    def bytes_per_page(specs: Sequence[LayerSpec | None], page_size: int, dtype: torch.dtype) -> int:
        elems = sum(s.page_elems() for s in specs if s is not None)
        return page_size * elems * torch.empty(0, dtype=dtype).element_size()

    @staticmethod
    def bytes_per_slot(states: Sequence[StateSpec | None]) -> int:
        """Bytes of one sequence's recurrent states, every layer's."""
        def size(shape: tuple[int, ...] | None, dtype: str) -> int:
            return 0 if shape is None else math.prod(shape) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()

        return sum(size(c, s.conv_dtype) for s in states if s is not None for c in s.conv) + sum(
            size(r, s.recurrent_dtype) for s in states if s is not None for r in s.recurrent)

    @contextmanager
    def bound(self, slots: torch.Tensor, fresh: bool) -> Iterator[None]:
        """Serve the recurrent states of ``slots`` (the step's rows) for one forward, and write
        them back after it; a forward that raises leaves the slots as they were. ``fresh``: the
        step's sequences have no state yet."""
        for layer in self.state_layers:
            layer.bind(slots, fresh)
        kept = None
        try:
            yield
            kept = slots
        finally:
            for layer in self.state_layers:
                layer.unbind(kept)

    def copy_slot(self, src: int, dst: int) -> None:
        """Give slot ``dst`` every layer's states of slot ``src``."""
        for layer in self.state_layers:
            layer.copy_slot(src, dst)

    def copy_page(self, src: int, dst: int) -> None:
        """Give page ``dst`` every layer's keys and values of page ``src``."""
        for layer in self.layers:
            if isinstance(layer, PagedLayer):
                layer.keys[dst].copy_(layer.keys[src])
                layer.values[dst].copy_(layer.values[src])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not in_step():
            raise RuntimeError("PagedCache is written only inside an hf_cb engine step")
        if not torch.compiler.is_compiling():  # the thread's state is not traced (and need not be)
            note_update(layer_idx)
        return self.layers[layer_idx].update(key_states, value_states)
