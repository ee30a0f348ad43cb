"""What hf_cb reads from a model before it runs it: each layer's attention, read off what the
model does in one recording forward (`read_attention`), its context length, and
`ModelNotSupported` for models whose layers hf_cb cannot serve."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from hf_cb.attention.context import note_update
from hf_cb.attention.forward import cache_keyword
from hf_cb.attention.shape import AttentionShape, LayerSpec, StateSpec
from hf_cb.attention_interface import AttentionCall, recording
from hf_cb.distributed.tensor_parallel import tensor_parallel_size

_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
# Layers that keep a recurrent state in the cache's linear-attention layers (Transformers maps
# these types to them), the hybrid ones besides K/V.
_STATE_LAYER_TYPES = {"linear_attention", "conv"}
_HYBRID_LAYER_TYPES = {"hybrid", "hybrid_sliding"}
_SERVED_LAYER_TYPES = _ATTENTION_LAYER_TYPES | _STATE_LAYER_TYPES | _HYBRID_LAYER_TYPES
# Why a layer type is refused: what the model does that hf_cb does not serve (yet).
_REFUSED_LAYER_TYPES = {
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
    unsupported = sorted(set(layer_types) - _SERVED_LAYER_TYPES - (_MLP_LAYER_TYPES if set(layer_types) & (
        _STATE_LAYER_TYPES | _HYBRID_LAYER_TYPES) else set()))
    if unsupported:
        # An MLP-only layer (nemotron_h's "moe") neither attends nor keeps a state: name the others.
        unsupported = [t for t in unsupported if t not in _MLP_LAYER_TYPES] or unsupported
        what = "; ".join(f"{t}: {_REFUSED_LAYER_TYPES.get(t, 'not an attention layer')}" for t in unsupported)
        raise ModelNotSupported(
            f"{name} has layers of type {unsupported} ({what}); hf_cb serves full, sliding-window and chunked "
            "attention layers, and linear-attention, state-space and convolution layers"
        )
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    chunk = getattr(config, "attention_chunk_size", None)
    if not layer_types:
        return [(window, None)] * num_layers
    return [(window if t in ("sliding_attention", "hybrid_sliding") else None,
             chunk if t == "chunked_attention" else None) for t in layer_types[:num_layers]]


def layer_roles(model: torch.nn.Module) -> list[tuple[bool, bool]]:
    """Each layer's ``(attends, keeps a recurrent state)`` as its config's ``layer_types`` say
    (a config without them: every layer attends)."""
    config = model.config.get_text_config(decoder=True)
    types = (getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    return [(t in _ATTENTION_LAYER_TYPES | _HYBRID_LAYER_TYPES, t in _STATE_LAYER_TYPES | _HYBRID_LAYER_TYPES)
            for t in types[: config.num_hidden_layers]]


class _RecordingCache(DynamicCache):
    """A `DynamicCache` that keeps the shapes of what each layer first gives `update`; built from
    the config where layers keep a recurrent state (Transformers then gives them linear-attention
    layers)."""

    def __init__(self, config=None) -> None:
        super().__init__(**({} if config is None else {"config": config}))
        self.given: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.given.setdefault(layer_idx, (tuple(key_states.shape), tuple(value_states.shape)))
        note_update(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def read_attention(model: torch.nn.Module) -> AttentionShape:
    """Each layer's attention as this process runs it (under tensor parallelism, its shard's),
    read off one forward of two tokens with the ``"hf_cb"`` function switched on: what each
    layer gives `Cache.update` (what its pages hold) and what its attention function receives
    (what the kernels compute over). Refuses models hf_cb cannot serve."""
    config = model.config.get_text_config(decoder=True)
    name = type(model).__name__
    kinds = layer_kinds(model)
    roles = layer_roles(model)
    check_heads(model)
    stateful = any(keeps for _, keeps in roles)
    cache = _RecordingCache(config if stateful else None)
    ids = torch.tensor([[3, 4]], device=model.device)
    with recording() as calls, torch.no_grad(), eval_mode(model):
        try:
            model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
        except Exception as error:
            if is_device_fault(error):
                raise
            raise ModelNotSupported(f"{name} failed a forward with hf_cb's attention function (outside a step, "
                                    f"over a DynamicCache): {type(error).__name__}: {error}") from error
    attending = [i for i, (attends, _) in enumerate(roles) if attends]
    by_layer = _calls_by_layer(name, calls, attending)
    layers = tuple(_spec(by_layer[i], cache.given.get(i), *kinds[i]) if i in by_layer else None
                   for i in range(len(kinds)))
    states = _states(name, cache, roles) if stateful else ()
    return AttentionShape(layers, logit_softcap=getattr(config, "attn_logit_softcapping", None), states=states)


def _calls_by_layer(name: str, calls: list[AttentionCall], attending: list[int]) -> dict[int, AttentionCall]:
    by_layer: dict[int, AttentionCall] = {}
    for call in calls:
        if call.layer_idx is None:
            raise ModelNotSupported(f"{name}'s attention module {type(call.module).__name__} has no int layer_idx, "
                                    "by which hf_cb finds a layer's pages")
        by_layer.setdefault(call.layer_idx, call)
    missing = [i for i in attending if i not in by_layer]
    if missing:
        raise ModelNotSupported(
            f"{name}: {len(missing)} of {len(attending)} attention layers did not call the attention interface "
            f"(layers {missing}); hf_cb serves models whose every layer does"
        )
    return by_layer


def _states(name: str, cache: DynamicCache, roles: list[tuple[bool, bool]]) -> tuple[StateSpec | None, ...]:
    """Each layer's recurrent states as the recording forward left them in the cache's
    linear-attention layers (batch of one)."""
    states: list[StateSpec | None] = []
    for i, (_, keeps) in enumerate(roles):
        layer = cache.layers[i] if i < len(cache.layers) else None
        if not keeps:
            states.append(None)
            continue
        if not isinstance(layer, LinearAttentionCacheLayerMixin):
            raise ModelNotSupported(f"{name}: layer {i} keeps a recurrent state, but not in a linear-attention "
                                    "cache layer")
        conv = [layer.conv_states.get(k) for k in range(layer.number_of_states)]
        recurrent = [layer.recurrent_states.get(k) for k in range(layer.number_of_states)]
        given = [t for t in (*conv, *recurrent) if t is not None]
        if not given:
            raise ModelNotSupported(
                f"{name}: layer {i} keeps its recurrent state outside the Cache (in its own modules), where "
                "hf_cb cannot keep one per sequence"
            )
        if not all(isinstance(t, torch.Tensor) and t.shape[0] == 1 for t in given):
            raise ModelNotSupported(f"{name}: layer {i}'s recurrent states are not one tensor per batch row")

        def shapes(ts):
            return tuple(None if t is None else tuple(t.shape[1:]) for t in ts)

        def dtype(ts):
            return next((str(t.dtype).removeprefix("torch.") for t in ts if t is not None), "float32")

        states.append(StateSpec(shapes(conv), shapes(recurrent), dtype(conv), dtype(recurrent)))
    return tuple(states)


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
    if not any(attends for attends, _ in layer_roles(model)):  # Mamba: no attention, only states
        return
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
