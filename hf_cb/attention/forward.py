"""The one call of the model's own forward for an engine step, shared by the eager path, the
CUDA graphs and the model probe."""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from hf_cb.attention.context import AttentionStep, stepping
from hf_cb.attention.shape import AttentionShape
from hf_cb.attention_interface import KV_DTYPE_KWARG, STEP_KWARG
from hf_cb.paged_cache import PagedCache


@lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    """The name the model's forward takes the cache by: ``cache`` from Transformers 5.24 (which
    still maps the old name, with a deprecation warning, until 5.40), ``past_key_values`` before."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model: torch.nn.Module) -> str:
    return _cache_keyword(type(model))


def step_mask(shape: AttentionShape, device: torch.device) -> torch.Tensor | None:
    """The ``attention_mask`` of a step: a 4-D placeholder, which makes the model build no mask
    of its own (the step does the masking); None for a model with no attention layers (Mamba's
    layers would multiply their input by it, as a padding mask)."""
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device) if shape.attention else None


def forward_step(forward, model: torch.nn.Module, cache: PagedCache, step: AttentionStep, input_ids: torch.Tensor,
                 position_ids: torch.Tensor, mask: torch.Tensor | None,
                 logits_to_keep: torch.Tensor | int) -> torch.Tensor:
    """Logits ``[S, V]`` of one step through ``forward`` (the model or its compiled forward):
    a packed step (``input_ids``/``position_ids`` ``[1, T]``; ``logits_to_keep``: a tensor of
    the token indices to return), or a batch-shaped one (``[B, L]``, for models with recurrent
    state; ``logits_to_keep=1``: each row's last token). ``mask``: `step_mask`. ``(cache, step)`` is the thread's current
    step for the forward only (`context.stepping`). A model that ignores ``logits_to_keep``
    (Whisper's decoder) returns every row, and they are picked here."""
    with stepping(cache, step), torch.no_grad():
        out = forward(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                      logits_to_keep=logits_to_keep,
                      **{cache_keyword(model): cache, STEP_KWARG: True, KV_DTYPE_KWARG: cache.dtype})
    if isinstance(logits_to_keep, int):
        return out.logits[:, -logits_to_keep:].flatten(0, 1)
    logits = out.logits[0]
    if logits.shape[0] != logits_to_keep.shape[0]:
        logits = logits[logits_to_keep]
    return logits
