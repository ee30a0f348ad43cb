"""What a model with recurrent state changes in the engine's config: its state pool's size,
which caps the running sequences, and what its layers cannot do (prefix caching; chunked
prefill, for models whose multi-token forward starts a fresh state)."""

from __future__ import annotations

import logging
from dataclasses import replace

from hf_cb.core.config import EngineConfig

logger = logging.getLogger("hf_cb")


def state_slots(budget: int, slot_bytes: int, max_num_seqs: int, has_pages: bool) -> int:
    """How many sequences' recurrent states the pool holds (at most ``max_num_seqs``): the
    states take at most half of ``budget`` bytes when the model also has K/V pages, which get
    the rest, and all of it otherwise. Raises if not even one fits."""
    share = budget // 2 if has_pages else budget
    slots = min(max_num_seqs, share // max(slot_bytes, 1))
    if slots < 1:
        raise RuntimeError(f"hf_cb: one sequence's recurrent state takes {slot_bytes / 2**20:.1f} MiB, more than the "
                           f"{share / 2**20:.1f} MiB it may have; give the KV cache more memory")
    return slots


def state_config(config: EngineConfig, slot_bytes: int, budget: int, *, has_pages: bool, chunked_prefill: bool,
                 max_model_len: int, model_name: str) -> EngineConfig:
    """``config`` for a model whose sequences each keep ``slot_bytes`` of recurrent state, with
    ``budget`` bytes for the KV cache and the states: no prefix caching (a cached prefix would
    need the state after it); every prompt prefilled in one step where the model cannot
    continue a state over several tokens (``chunked_prefill`` False); ``max_num_seqs`` at most
    the slots that fit (`state_slots`). Logs each change."""
    changes: dict = {"enable_prefix_caching": False}
    if config.enable_prefix_caching:
        logger.info("hf_cb: prefix caching is off for a model with recurrent state (a cached prefix would need "
                    "the state after it, which hf_cb does not snapshot)")
    if not chunked_prefill and config.max_num_batched_tokens < max_model_len:
        logger.info("hf_cb: %s starts a fresh state in every multi-token forward: each prompt is prefilled in one "
                    "step (max_num_batched_tokens %d -> %d)", model_name, config.max_num_batched_tokens, max_model_len)
        changes["max_num_batched_tokens"] = max_model_len
    slots = state_slots(budget, slot_bytes, config.max_num_seqs, has_pages)
    capped = "" if slots == config.max_num_seqs else (
        f"; max_num_seqs {config.max_num_seqs} -> {slots}, the slots that fit in "
        f"{'half ' if has_pages else ''}the {budget / 2**30:.2f} GiB of KV memory")
    logger.info("hf_cb: recurrent state: %d slots of %.2f MiB (%.2f GiB), one per running sequence%s",
                slots, slot_bytes / 2**20, slots * slot_bytes / 2**30, capped)
    changes["max_num_seqs"] = slots
    return replace(config, **changes)
