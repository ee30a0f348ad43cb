"""The step context: which engine step, if any, this thread's forward is running.

Inside an engine step the model's attention layers reach the step's pages and its planned
backend through here, not through their arguments (vLLM's attention ops reach their KV cache
the same way): `torch.compile` then sees no mutated inputs, and the model's own forward runs
unchanged. `AttentionStep` is what a backend plans once per step and every layer uses.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from transformers.cache_utils import Cache

_local = threading.local()


class AttentionStep(Protocol):
    """One planned step of an attention backend; built once per step, used by every layer.

    ``sliding_window``, ``chunk`` and ``sinks`` are a layer's (`LayerSpec`); ``sinks`` a tensor of
    per-head sink logits. `gather` and `attend_context` serve ``context`` layers (MLA), whose
    cache update returns each sequence's whole context; a backend without them serves no such
    model (`AttentionShape.flashinfer_unsupported`)."""

    def write_kv(
        self, k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Write the step's new ``key``/``value`` (``[T, Hkv, D]``, in the pages' dtype) into their slots."""

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        scaling: float,
        sliding_window: int | None,
        softcap: float | None,
        chunk: int | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the step's queries ``[T, H, D]`` over their sequences' pages."""

    def gather(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's whole context from the pages, rows one after another: ``[C, heads, dim]``."""

    def attend_context(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        scaling: float,
        sliding_window: int | None,
        softcap: float | None,
        chunk: int | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the step's queries ``[T, H, D]`` over K/V given for each row's whole
        context, as `gather` lays them out (``[C, H, D]``)."""


@contextmanager
def stepping(cache: Cache, step: AttentionStep) -> Iterator[None]:
    """Make ``(cache, step)`` this thread's current step for one forward. ``cache``: a cache whose
    ``layers[i]`` hold layer i's pages as ``keys`` and ``values``."""
    previous = getattr(_local, "current", None)
    _local.current = (cache, step)
    try:
        yield
    finally:
        _local.current = previous


def current_step() -> tuple[Cache, AttentionStep] | None:
    """This thread's ``(cache, step)``, or None outside a step."""
    return getattr(_local, "current", None)


def note_update(layer_idx: int) -> None:
    """A cache's ``update`` for layer ``layer_idx`` ran on this thread: the attention call that
    follows is that layer's, whatever its module's ``layer_idx`` (Zamba's one attention block
    serves several layers, which hand the index to ``update``)."""
    _local.last_update = layer_idx


def last_update() -> int | None:
    """The layer of this thread's last cache ``update`` (`note_update`), or None."""
    return getattr(_local, "last_update", None)


def in_step() -> bool:
    """Whether this thread is inside an engine step's forward. While `torch.compile` traces, yes:
    only engine steps run the compiled forward (and the thread's state is not traced)."""
    return torch.compiler.is_compiling() or getattr(_local, "current", None) is not None
