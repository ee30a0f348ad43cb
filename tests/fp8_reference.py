"""The oracle for fp8 KV pages: Transformers' own forward with every key and value rounded as
the pages store them (`to_cache_dtype`), through an attention function registered for it.
Rounding is elementwise and idempotent, so rounding the whole (unrounded) cache at every step
equals storing rounded values once."""

from contextlib import contextmanager

from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

import hf_cb
from hf_cb.attention_interface import _plain_attention
from hf_cb.paged_cache import FP8, to_cache_dtype

NAME = "fp8_kv_reference"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    key, value = (to_cache_dtype(t, FP8).to(query.dtype) for t in (key, value))
    # hf_cb's own attention outside a step: SDPA, or the model's eager one for a soft-cap.
    return _plain_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def fp8_kv_forward(model):
    """``model`` (without an engine) running the fp8-KV reference attention."""
    hf_cb.release(model)
    original = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(original)
