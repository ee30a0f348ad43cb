"""The attention function registered as ``"hf_cb"`` with Transformers' `AttentionInterface`.

Inside an engine step the model's forward receives ``hf_cb_step=True`` (Transformers hands
extra keywords of ``model(...)`` to every attention call); `PagedCache.update` has returned the
layer's new K/V as they came, and the op `paged_attention` (`attention.ops`) writes them into
the layer's pages and attends each sequence's own pages through the current step's backend. Outside a step the
function is plain SDPA (eager where the layer needs a logit soft-cap), so the model stays usable
for training and evaluation.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hf_cb.attention.context import last_update
from hf_cb.attention.ops import paged_attention
from hf_cb.paged_cache import to_cache_dtype, tokens_first

ATTENTION_NAME = "hf_cb"
_recorder: ContextVar[list | None] = ContextVar("hf_cb_attention_recorder", default=None)
STEP_KWARG = "hf_cb_step"
KV_DTYPE_KWARG = "hf_cb_kv_dtype"  # the pages' dtype, handed in with STEP_KWARG


def hf_cb_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    kv_dtype = kwargs.pop(KV_DTYPE_KWARG, None)
    if not kwargs.pop(STEP_KWARG, False):
        calls = _recorder.get()
        if calls is not None:
            calls.append(AttentionCall(module, tuple(query.shape), tuple(key.shape), tuple(value.shape),
                                       kwargs.get("sliding_window"), kwargs.get("s_aux") is not None,
                                       layer_of(module)))
        return _plain_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    layer_idx = layer_of(module)
    if layer_idx is None:
        raise NotImplementedError(f"hf_cb needs attention modules with an int layer_idx; {type(module).__name__} has none")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if kv_dtype is not None:
        # The one cast to the pages' dtype (the backends' `write_kv` take K/V as the pages hold
        # them). Here, not in the op: a compiled forward then fuses it into the kernel that makes
        # the keys (the rotary embedding) instead of launching two more per layer.
        key, value = to_cache_dtype(key, kv_dtype), to_cache_dtype(value, kv_dtype)
    # Tensors arrive as [B, heads, L, D] (one packed row, B = 1, or a batch-shaped step's B rows
    # of L tokens); the step works on its tokens, row after row: [B * L, heads, D].
    sinks = kwargs.get("s_aux")  # gpt-oss's per-head sink logits
    if sinks is not None and hasattr(sinks, "to_local"):  # a tensor-parallel shard's: its own heads
        sinks = sinks.to_local()
    out = paged_attention(
        tokens_first(query),
        tokens_first(key),
        tokens_first(value),
        layer_idx,
        float(scaling),
        kwargs.get("sliding_window"),
        kwargs.get("softcap"),
        sinks,
    )
    return out.reshape(query.shape[0], query.shape[2], *out.shape[1:]), None


def layer_of(module: torch.nn.Module) -> int | None:
    """The layer an attention call belongs to: its module's ``layer_idx``, or where a module
    serves several layers (no index of its own, or -1), the layer of the cache update just
    before it."""
    layer_idx = getattr(module, "layer_idx", None)
    if isinstance(layer_idx, int) and layer_idx >= 0:
        return layer_idx
    return last_update()


def _plain_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    if kwargs.get("softcap") is None and kwargs.get("s_aux") is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    # SDPA has no soft-cap or sinks: use the model's own eager attention with an additive mask.
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min
        )
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def hf_cb_mask(*args, **kwargs):
    """SDPA's boolean mask, always materialised: the eager fallback cannot infer causality."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


@dataclass(frozen=True)
class AttentionCall:
    """One call of the ``"hf_cb"`` function outside a step, as `recording` keeps it: the shapes are
    ``[batch, heads, tokens, dim]``."""

    module: torch.nn.Module
    query: tuple[int, ...]
    key: tuple[int, ...]
    value: tuple[int, ...]
    sliding_window: int | None
    sinks: bool
    layer_idx: int | None  # `layer_of` the module


@contextmanager
def recording() -> Iterator[list[AttentionCall]]:
    """Record each call of the ``"hf_cb"`` function outside engine steps (`AttentionCall`):
    `model_support` reads a model's attention off them."""
    calls: list[AttentionCall] = []
    token = _recorder.set(calls)
    try:
        yield calls
    finally:
        _recorder.reset(token)


def register() -> None:
    """Register the attention and mask functions under `ATTENTION_NAME` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, hf_cb_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, hf_cb_mask)
