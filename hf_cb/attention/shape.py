"""`AttentionShape`: what the pages and the kernels must know of a model's attention."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionShape:
    """A model's attention as one process runs it (under tensor parallelism, its shard's heads)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    logit_softcap: float | None = None  # Gemma 2's attention logit soft-cap
