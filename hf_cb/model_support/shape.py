"""What hf_cb reads from a model before it runs it: each layer's attention, read off what the
model does in one recording forward (`read_attention`), its context length, and
`ModelNotSupported` for models whose layers hf_cb cannot serve."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import DynamicCache

from hf_cb.attention.forward import cache_keyword
from hf_cb.attention.shape import AttentionShape, LayerSpec
from hf_cb.attention_interface import AttentionCall, recording
from hf_cb.distributed.tensor_parallel import tensor_parallel_size

_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
# Why a layer type is refused: what the model does that hf_cb does not serve (yet).
_REFUSED_LAYER_TYPES = {
    "linear_attention": "linear-attention or state-space layers, which keep a recurrent state",
    "conv": "convolution layers, which keep a recurrent state",
    "hybrid": "layers that combine attention with a recurrent state",
    "hybrid_sliding": "layers that combine attention with a recurrent state",
    "indexed_attention": "sparse attention chosen by an indexer (DeepSeek sparse attention)",
    "compressed_sparse_attention": "compressed sparse attention",
    "heavily_compressed_attention": "heavily compressed attention",
    "minimax_m3_sparse": "sparse attention chosen by a lightning indexer",
    "window_attention": "attention within non-overlapping windows",
    "reference_sliding_attention": "attention over the prompt plus a ring buffer of generated tokens",
}
_MLP_LAYER_TYPES = {"mlp", "moe", "sparse", "dense"}
_CONTEXT_NAMES = ("max_position_embeddings", "max_target_positions", "n_positions", "max_sequence_length",
                  "seq_length", "n_ctx")


# Failures of the device, not of the model: they propagate as they are (AcceleratorError: torch 2.8+).
_DEVICE_FAULTS = (torch.OutOfMemoryError, *((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()))


class ModelNotSupported(ValueError):
    """The model cannot run on hf_cb; the message says why."""


def is_device_fault(error: BaseException) -> bool:
    """Out of memory, or a fault of the device (before torch 2.8, a plain RuntimeError)."""
    return isinstance(error, _DEVICE_FAULTS) or (isinstance(error, RuntimeError) and "CUDA error" in str(error))


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's config allows (Whisper calls it ``max_target_positions``),
    or None where it names none."""
    config = model.config.get_text_config(decoder=True)
    return next((v for n in _CONTEXT_NAMES if isinstance(v := getattr(config, n, None), int) and v > 0), None)


def layer_kinds(model: torch.nn.Module) -> list[tuple[int | None, int | None]]:
    """Each layer's ``(sliding window, chunk)`` as its config makes the model's masks. Refuses
    models whose layers hf_cb cannot serve, naming what they do."""
    config = model.config.get_text_config(decoder=True)
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ModelNotSupported(f"{name} is an encoder-decoder model; hf_cb serves decoder-only LMs")
    layer_types = getattr(config, "layer_types", None) or []
    unsupported = sorted(set(layer_types) - _ATTENTION_LAYER_TYPES)
    if unsupported:
        # An MLP-only layer (nemotron_h's "moe") neither attends nor keeps a state: name the others.
        unsupported = [t for t in unsupported if t not in _MLP_LAYER_TYPES] or unsupported
        what = "; ".join(f"{t}: {_REFUSED_LAYER_TYPES.get(t, 'not an attention layer')}" for t in unsupported)
        raise ModelNotSupported(
            f"{name} has layers of type {unsupported} ({what}); hf_cb serves full, sliding-window and chunked "
            "attention layers"
        )
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    chunk = getattr(config, "attention_chunk_size", None)
    if not layer_types:
        return [(window, None)] * num_layers
    return [(window if t == "sliding_attention" else None, chunk if t == "chunked_attention" else None)
            for t in layer_types[:num_layers]]


class _RecordingCache(DynamicCache):
    """A `DynamicCache` that keeps the shapes of what each layer first gives `update`."""

    def __init__(self) -> None:
        super().__init__()
        self.given: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.given.setdefault(layer_idx, (tuple(key_states.shape), tuple(value_states.shape)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def read_attention(model: torch.nn.Module) -> AttentionShape:
    """Each layer's attention as this process runs it (under tensor parallelism, its shard's),
    read off one forward of two tokens with the ``"hf_cb"`` function switched on: what each
    layer gives `Cache.update` (what its pages hold) and what its attention function receives
    (what the kernels compute over). Refuses models hf_cb cannot serve."""
    config = model.config.get_text_config(decoder=True)
    name = type(model).__name__
    kinds = layer_kinds(model)
    check_heads(model)
    cache = _RecordingCache()
    ids = torch.tensor([[3, 4]], device=model.device)
    with recording() as calls, torch.no_grad(), eval_mode(model):
        try:
            model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
        except Exception as error:
            if is_device_fault(error):
                raise
            raise ModelNotSupported(f"{name} failed a forward with hf_cb's attention function (outside a step, "
                                    f"over a DynamicCache): {type(error).__name__}: {error}") from error
    by_layer = _calls_by_layer(name, calls, len(kinds))
    layers = tuple(_spec(by_layer[i], cache.given.get(i), *kinds[i]) for i in range(len(kinds)))
    return AttentionShape(layers, logit_softcap=getattr(config, "attn_logit_softcapping", None))


def _calls_by_layer(name: str, calls: list[AttentionCall], num_layers: int) -> dict[int, AttentionCall]:
    by_layer: dict[int, AttentionCall] = {}
    for call in calls:
        layer_idx = getattr(call.module, "layer_idx", None)
        if not isinstance(layer_idx, int):
            raise ModelNotSupported(f"{name}'s attention module {type(call.module).__name__} has no int layer_idx, "
                                    "by which hf_cb finds a layer's pages")
        by_layer.setdefault(layer_idx, call)
    missing = [i for i in range(num_layers) if i not in by_layer]
    if missing:
        raise ModelNotSupported(
            f"{name}: {len(missing)} of {num_layers} attention layers did not call the attention interface "
            f"(layers {missing}); hf_cb serves models whose every layer does"
        )
    return by_layer


def _spec(call: AttentionCall, given: tuple | None, window: int | None, chunk: int | None) -> LayerSpec:
    """A layer's `LayerSpec`: its pages hold what it gives `Cache.update` (or, for a layer that
    updates no cache, as Gemma's K/V-sharing layers, what its attention receives)."""
    attended = (call.key[1], call.key[3], call.value[1], call.value[3])
    cached = attended if given is None else (given[0][1], given[0][3], given[1][1], given[1][3])
    return LayerSpec(call.query[1], *cached, window=window if window is not None else call.sliding_window,
                     chunk=chunk, context=cached != attended, sinks=call.sinks)


def check_heads(model: torch.nn.Module) -> None:
    """Refuse a model without attention heads, or whose heads its tensor-parallel ranks cannot
    split into whole heads (Transformers' plans split q, k and v alike; hf_cb does not replicate
    K/V heads). Checked before anything runs the model: a shard of half a head fails its forward."""
    config = model.config.get_text_config(decoder=True)
    name = type(model).__name__
    layers = getattr(config, "per_layer_config", None)  # where heads vary by layer (Gemma 4, dots.llm3)
    heads = [(getattr(c, "num_attention_heads", None), getattr(c, "num_key_value_heads", None))
             for c in (list(layers) if layers is not None else [config])]
    if not all(q for q, _ in heads):  # RWKV, xLSTM...: no attention at all
        raise ModelNotSupported(f"{name}'s config names no attention heads; hf_cb serves attention LMs")
    tp_size = tensor_parallel_size(model)
    for q, kv in heads:
        kv = kv or q
        if kv % tp_size or q % tp_size:
            raise ModelNotSupported(
                f"{name} has {q} query and {kv} K/V heads, which {tp_size} tensor-parallel ranks cannot "
                f"split into whole heads; hf_cb does not replicate K/V heads: use a tensor-parallel size that "
                f"divides {math.gcd(q, kv)}"
            )


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
