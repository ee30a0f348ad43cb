"""How many KV pages fit on a CUDA device: measured, not guessed.

The engine runs one worst-case step (`worst_case_step`: ``max_num_batched_tokens`` tokens, logits
and sampling with every processor for ``max_num_seqs`` rows) on a throwaway pool and measures its
peak (`step_peak_bytes`); ``memory_utilization`` of the memory that remains beside that peak goes
to pages (`pages_that_fit`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_cb.core.config import EngineConfig
from hf_cb.core.scheduler import ScheduledBatch
from hf_cb.core.sequence import Sequence
from hf_cb.sampling.params import SamplingParams

logger = logging.getLogger("hf_cb")


@dataclass
class WorstCaseStep:
    """The largest step the config allows: ``batch`` over sequences of ``tokens_per_row`` tokens
    each, which need ``num_pages`` pages in all."""

    batch: ScheduledBatch
    tokens_per_row: int
    num_pages: int


def worst_case_step(config: EngineConfig, max_model_len: int) -> WorstCaseStep:
    """As many rows as a step may hold, sharing the step's token budget, every sampling
    processor on (they allocate ``[rows, vocab]`` tensors)."""
    rows = min(config.max_num_seqs, config.max_num_batched_tokens)
    per_row = min(config.max_num_batched_tokens // rows, max_model_len)
    params = SamplingParams(
        1, do_sample=True, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
        eos_token_ids=(0,), min_new_tokens=1,
    )
    seqs = [Sequence(-1 - i, [1] * per_row, params, seed=i) for i in range(rows)]
    return WorstCaseStep(ScheduledBatch(seqs, [per_row] * rows), per_row, rows * -(-per_row // config.page_size))


def step_peak_bytes(device: torch.device, run: Callable[[], object]) -> int:
    """The device memory ``run()`` allocates at its peak, beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def pages_that_fit(device: torch.device, peak: int, config: EngineConfig, page_bytes: int, max_model_len: int,
                   reserved: int = 0) -> int:
    """``memory_utilization`` of the free memory, less a step's ``peak`` and ``reserved`` bytes
    (the recurrent-state pool), in pages. Call it once the throwaway pool is freed."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    num_pages = int((config.memory_utilization * (free - peak) - reserved) // page_bytes)
    if num_pages * config.page_size < max_model_len:
        raise RuntimeError(
            f"hf_cb: only {num_pages} KV pages fit in GPU memory (a worst-case step takes "
            f"{peak / 2**30:.2f} GiB); lower max_num_batched_tokens or max_num_seqs"
        )
    logger.info("hf_cb: a worst-case step peaks at %.2f GiB; %.2f GiB free", peak / 2**30, free / 2**30)
    return num_pages

