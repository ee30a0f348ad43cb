"""How many KV pages fit on a CUDA device: measured, not guessed."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .sampling import SamplingParams
from .scheduler import ScheduledBatch
from .sequence import Sequence

if TYPE_CHECKING:
    from .engine import LLMEngine

logger = logging.getLogger("hf_cb")


def profile_num_pages(engine: "LLMEngine") -> int:
    """Run one worst-case step (``max_num_batched_tokens`` tokens, logits and sampling for
    ``max_num_seqs`` rows) on a throwaway pool, then give ``memory_utilization`` of the
    memory that remains beside its peak to pages."""
    config = engine.config
    rows = min(config.max_num_seqs, config.max_num_batched_tokens)
    per_row = min(config.max_num_batched_tokens // rows, engine.max_model_len)
    engine._build(rows * -(-per_row // config.page_size))
    params = SamplingParams(
        1, do_sample=True, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
        eos_token_ids=(0,), min_new_tokens=1,
    )
    seqs = [Sequence(-1 - i, [1] * per_row, params, seed=i) for i in range(rows)]
    for s in seqs:
        engine.manager.allocate(s.seq_id, per_row)
    torch.cuda.synchronize(engine.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(engine.device)
    before = torch.cuda.memory_allocated(engine.device)
    engine.runner.run(ScheduledBatch(seqs, [per_row] * rows))
    torch.cuda.synchronize(engine.device)
    peak = torch.cuda.max_memory_allocated(engine.device) - before
    engine.drop_pool()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(engine.device)
    budget = config.memory_utilization * (free - peak)
    num_pages = int(budget // engine.page_bytes)
    if num_pages * config.page_size < engine.max_model_len:
        raise RuntimeError(
            f"hf_cb: only {num_pages} KV pages fit in GPU memory (a worst-case step takes "
            f"{peak / 2**30:.2f} GiB); lower max_num_batched_tokens or max_num_seqs"
        )
    logger.info("hf_cb: a worst-case step peaks at %.2f GiB; %.2f GiB free", peak / 2**30, free / 2**30)
    return num_pages
