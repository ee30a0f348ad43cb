"""What hf_cb reads from a model before it runs it: the attention shape and each layer's
window, and `ModelNotSupported` for models whose layers hf_cb cannot serve."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import DynamicCache

from hf_cb.attention.forward import cache_keyword
from hf_cb.attention.shape import AttentionShape
from hf_cb.distributed.tensor_parallel import tensor_parallel_size

_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


class ModelNotSupported(ValueError):
    """The model cannot run on hf_cb; the message says why."""


def layer_windows(model: torch.nn.Module) -> list[int | None]:
    """Each layer's sliding window (None: full attention). Refuses layers hf_cb cannot serve."""
    config = model.config.get_text_config(decoder=True)
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ModelNotSupported(f"{name} is an encoder-decoder model; hf_cb serves decoder-only LMs")
    layer_types = getattr(config, "layer_types", None) or []
    unsupported = sorted(set(layer_types) - _ATTENTION_LAYER_TYPES)
    if unsupported:
        raise ModelNotSupported(
            f"{name} has layers of type {unsupported}, which do not attend through the attention "
            "interface; hf_cb serves full and sliding-window attention layers"
        )
    if any(hasattr(m, "sinks") for m in model.modules()):
        raise ModelNotSupported(f"{name} uses attention sinks, which hf_cb does not support")
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if not layer_types:
        return [window] * num_layers
    return [window if t == "sliding_attention" else None for t in layer_types[:num_layers]]


def attention_shape(model: torch.nn.Module) -> AttentionShape:
    """The attention of this process's model: under tensor parallelism, of its shard."""
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_attention_heads", None)
    if not heads:  # RWKV, xLSTM...: no attention at all
        raise ModelNotSupported(f"{type(model).__name__}'s config names no attention heads; hf_cb serves attention LMs")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tp_size = tensor_parallel_size(model)
    if tp_size > 1:
        heads, kv_heads = _shard_heads(model, heads, kv_heads, tp_size)
    return AttentionShape(
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        logit_softcap=getattr(config, "attn_logit_softcapping", None),
    )


def _shard_heads(model: torch.nn.Module, heads: int, kv_heads: int, tp_size: int) -> tuple[int, int]:
    """This rank's (query heads, K/V heads) of a tensor-parallel model. The config keeps the
    model's global numbers, so the K/V heads are counted on what the shard's own forward writes
    to a cache; the query heads keep the model's group size (Transformers' plans split q, k and
    v alike)."""
    name = type(model).__name__
    if kv_heads % tp_size or heads % tp_size:
        raise ModelNotSupported(
            f"{name} has {heads} query and {kv_heads} K/V heads, which {tp_size} tensor-parallel ranks cannot "
            f"split into whole heads; hf_cb does not replicate K/V heads: use a tensor-parallel size that "
            f"divides {math.gcd(heads, kv_heads)}"
        )
    cache = DynamicCache()
    ids = torch.ones(1, 1, dtype=torch.long, device=model.device)
    with torch.no_grad(), eval_mode(model):
        model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
    written = {layer.keys.shape[1] for layer in cache.layers}
    if len(written) != 1:
        raise ModelNotSupported(f"{name}'s layers hold different numbers of K/V heads on a rank: {sorted(written)}")
    local = written.pop()
    return heads * local // kv_heads, local


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off (for probe forwards); each module's own training flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
