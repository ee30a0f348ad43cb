"""The one call of the model's own forward for an engine step, shared by the eager path, the
CUDA graphs and the model probe."""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from hf_cb.attention.context import AttentionStep, stepping
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


def forward_step(forward, model: torch.nn.Module, cache: PagedCache, step: AttentionStep, input_ids: torch.Tensor,
                 position_ids: torch.Tensor, mask: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """Logits ``[S, V]`` of one packed step (``input_ids``/``position_ids`` ``[1, T]``) through
    ``forward`` (the model or its compiled forward). The 4-D ``mask`` makes the model build no
    mask of its own; the step does the masking. ``(cache, step)`` is the thread's current step for
    the forward only (`context.stepping`). ``logits_to_keep``: the rows to return (a tensor of
    token indices); a model that ignores it (Whisper's decoder) returns every row, and they are
    picked here."""
    with stepping(cache, step), torch.no_grad():
        out = forward(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                      logits_to_keep=logits_to_keep,
                      **{cache_keyword(model): cache, STEP_KWARG: True, KV_DTYPE_KWARG: cache.dtype})
    logits = out.logits[0]
    if logits.shape[0] != logits_to_keep.shape[0]:
        logits = logits[logits_to_keep]
    return logits
