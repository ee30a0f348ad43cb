"""Which models hf_cb can serve, and the shape of their attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    if not model.is_backend_compatible():
        raise ModelNotSupported(
            f"{name} does not route attention through transformers' AttentionInterface"
        )
    if any(hasattr(m, "sinks") for m in model.modules()):
        raise ModelNotSupported(f"{name} uses attention sinks, which hf_cb does not support")
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if not layer_types:
        return [window] * num_layers
    return [window if t == "sliding_attention" else None for t in layer_types[:num_layers]]


@dataclass(frozen=True)
class AttentionShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def attention_shape(model: torch.nn.Module) -> AttentionShape:
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    return AttentionShape(
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )
