"""Prompt log-probabilities (vLLM's ``prompt_logprobs``): which logits of a step score prompt
tokens, and their log-probabilities computed a block of rows at a time.

A row that feeds prompt positions ``c .. c + n - 1`` of a sequence that asked for them scores,
at each position ``p`` before the prompt's last, the prompt token ``p + 1`` (the prompt's last
position scores the first generated token: that is the sampled token's own log-probability).
Chunked prefill scores each chunk's positions in its own step; the chunk's last position
scores the next chunk's first token, which is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hf_cb.core.scheduler import ScheduledBatch
from hf_cb.core.sequence import Sequence, TokenLogprob
from hf_cb.manager import PageTable
from hf_cb.sampling.sampler import compute_logprobs

# Rows of logits turned into float32 log-probabilities at once: a long prompt's scores never
# hold a [prompt_len, vocab] float32 tensor.
SCORE_BLOCK = 256


@dataclass
class PromptScoring:
    """The prompt positions a step scores: ``indices`` (the step's flat token indices whose
    logits score them), ``targets`` (the token each scores), ``entries`` (the sequence and the
    scored token's position), ``k`` (most alternatives any of them asked for)."""

    indices: np.ndarray
    targets: np.ndarray
    entries: list[tuple[Sequence, int]]
    k: int


def prompt_scoring(batch: ScheduledBatch, table: PageTable) -> PromptScoring | None:
    """What the step scores, or None when none of its rows scores a prompt token."""
    indices, targets, entries, k = [], [], [], 0
    for row, seq in enumerate(batch.seqs):
        if seq.params.prompt_logprobs is None:
            continue
        start = seq.num_cached_tokens
        end = min(start + batch.num_new_tokens[row], len(seq.prompt_ids) - 1)
        if end <= start:
            continue
        first = int(table.qo_indptr[row])
        indices.extend(range(first, first + end - start))
        targets.extend(seq.prompt_ids[start + 1 : end + 1])
        entries.extend((seq, p + 1) for p in range(start, end))
        k = max(k, seq.params.prompt_logprobs)
    if not indices:
        return None
    return PromptScoring(np.asarray(indices, np.int64), np.asarray(targets, np.int64), entries, k)


def score(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """`compute_logprobs` rows of ``logits`` for ``targets``, then each target's rank (1 for the
    most likely token): ``[N, 2 + 2k]`` float32, a block of `SCORE_BLOCK` rows at a time."""
    blocks = []
    for i in range(0, len(targets), SCORE_BLOCK):
        block, target = logits[i : i + SCORE_BLOCK].float(), targets[i : i + SCORE_BLOCK]
        rank = (block > block.gather(1, target[:, None])).sum(1, keepdim=True) + 1
        blocks.append(torch.cat([compute_logprobs(block, target, k), rank.float()], dim=1))
    return torch.cat(blocks)


def unpack(scoring: PromptScoring, rows: list[list[float]]) -> list[tuple[Sequence, int, TokenLogprob]]:
    """(sequence, position, `TokenLogprob`) per scored prompt token, each with the alternatives
    its sequence asked for."""
    k = scoring.k
    out = []
    for (seq, pos), target, row in zip(scoring.entries, scoring.targets.tolist(), rows):
        want = seq.params.prompt_logprobs
        top = [(int(i), lp) for i, lp in zip(row[1 : 1 + want], row[1 + k : 1 + k + want])]
        out.append((seq, pos, TokenLogprob(target, row[0], top, rank=int(row[-1]))))
    return out
