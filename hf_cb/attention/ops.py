"""One layer's attention in an engine step, as one custom op: ``hf_cb::paged_attention``.

The ``"hf_cb"`` attention function hands the layer's queries and new K/V here; the op writes
the K/V into the layer's pages and attends over each sequence's pages, both through the step's
backend. Why an op: `torch.compile` traces it as one opaque node, so a compiled forward is one
graph (no graph break per layer, so one compilation rather than one per fragment, and no
per-fragment guard checks on eager steps). Why one op for both: the write must come before the
read, and the compiler sees no data dependency between two opaque calls. The op takes the step
and the pages from the thread's current step (`context.stepping`), not from its arguments, so
the compiler sees no mutated inputs.
"""

from __future__ import annotations

import torch

from hf_cb.attention.context import current_step


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_idx: int, scaling: float,
                    sliding_window: int | None, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """Write ``key``/``value`` (``[T, Hkv, D]``) into layer ``layer_idx``'s pages, then attend
    the step's queries ``[T, H, D]`` over their sequences' pages; ``[T, H, Dv]``. (For a
    ``context`` layer, whose cache update wrote them already, ``key``/``value`` are each
    sequence's whole context, and the op attends over them.)"""
    if torch.compiler.is_compiling():
        return torch.ops.hf_cb.paged_attention(query, key, value, layer_idx, scaling, sliding_window, softcap, sinks)
    return _run(query, key, value, layer_idx, scaling, sliding_window, softcap, sinks)


def _run(query, key, value, layer_idx, scaling, sliding_window, softcap, sinks) -> torch.Tensor:
    current = current_step()
    if current is None:
        raise RuntimeError("hf_cb's paged attention runs only inside an engine step")
    cache, step = current
    layer = cache.layers[layer_idx]
    spec = layer.spec
    # The layer's window as the model's mask would apply it (its config); the keyword where the
    # config names none.
    options = dict(scaling=scaling, sliding_window=spec.window if spec.window is not None else sliding_window,
                   softcap=softcap, chunk=spec.chunk, sinks=sinks)
    if spec.context:
        return step.attend_context(query, key, value, **options)
    step.write_kv(layer.keys, layer.values, key, value)
    return step.attend(query, layer.keys, layer.values, **options)


def _fake(query, key, value, layer_idx, scaling, sliding_window, softcap, sinks) -> torch.Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


_lib = torch.library.Library("hf_cb", "FRAGMENT")
# Fixed stride order: the op sees its inputs laid out as in eager mode (FlashInfer's append
# takes the K/V views the model produced).
_lib.define(
    "paged_attention(Tensor query, Tensor key, Tensor value, int layer_idx, float scaling, int? sliding_window, "
    "float? softcap, Tensor? sinks) -> Tensor",
    tags=(torch.Tag.needs_fixed_stride_order,),
)
_lib.impl("paged_attention", _run, "CompositeExplicitAutograd")
torch.library.register_fake("hf_cb::paged_attention", _fake, lib=_lib)
