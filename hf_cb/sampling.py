"""Per-request sampling with Transformers' semantics, vectorised over the rows of a step.

The processors run in the order `generate` applies them: repetition penalty, the minimum-length
EOS ban, then (sampling rows only) temperature, top-k, top-p and min-p. Random draws come from a
counter-based hash of (seed, output index, token id): a seeded request draws the same numbers
whatever else is in the batch, and nothing holds generator state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. Neutral values switch a processor off."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class SamplingBatch:
    """One step's sampling inputs, a row per sampled sequence; ``None`` means unused this step."""

    do_sample: torch.Tensor | None  # [B] bool
    temperature: torch.Tensor | None  # [B, 1]
    top_k: torch.Tensor | None  # [B] int64, 0 = off
    top_p: torch.Tensor | None  # [B, 1]
    min_p: torch.Tensor | None  # [B, 1]
    seeds: torch.Tensor | None  # [B] int64
    offsets: torch.Tensor | None  # [B] int64: index of the token being drawn
    penalty: torch.Tensor | None  # [B, 1]
    penalty_ids: torch.Tensor | None  # [B, L] int64, token ids seen so far (padded by repeats)
    ban_eos: torch.Tensor | None  # [B, V] bool, True where an EOS token is banned


def make_sampling_batch(
    params: Seq[SamplingParams],
    seeds: Seq[int],
    token_ids: Seq[list[int]],
    num_generated: Seq[int],
    vocab_size: int,
    device: torch.device,
) -> SamplingBatch:
    """Tensors for the rows of a step. ``token_ids`` are each row's prompt plus output so far."""
    sampling = [p.do_sample for p in params]
    any_sample = any(sampling)
    penalised = any(p.repetition_penalty != 1.0 for p in params)
    banned = [(i, p.eos_token_ids) for i, p in enumerate(params) if num_generated[i] < p.min_new_tokens]

    def col(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype).view(-1, 1).to(device, non_blocking=True)

    batch = SamplingBatch(None, None, None, None, None, None, None, None, None, None)
    if any_sample:
        batch.do_sample = torch.tensor(sampling, dtype=torch.bool).to(device, non_blocking=True)
        batch.temperature = col([p.temperature if p.do_sample else 1.0 for p in params])
        if any(p.do_sample and p.top_k > 0 for p in params):
            ks = [p.top_k if p.do_sample else 0 for p in params]
            batch.top_k = torch.tensor(ks, dtype=torch.int64).to(device, non_blocking=True)
        if any(p.do_sample and p.top_p < 1.0 for p in params):
            batch.top_p = col([p.top_p if p.do_sample else 1.0 for p in params])
        if any(p.do_sample and p.min_p > 0.0 for p in params):
            batch.min_p = col([p.min_p if p.do_sample else 0.0 for p in params])
        batch.seeds = torch.tensor(list(seeds), dtype=torch.int64).to(device, non_blocking=True)
        batch.offsets = torch.tensor(list(num_generated), dtype=torch.int64).to(device, non_blocking=True)
    if penalised:
        batch.penalty = col([p.repetition_penalty for p in params])
        width = max(len(ids) for ids in token_ids)
        padded = [ids + [ids[0]] * (width - len(ids)) for ids in token_ids]
        batch.penalty_ids = torch.tensor(padded, dtype=torch.int64).to(device, non_blocking=True)
    if banned:
        ban = torch.zeros(len(params), vocab_size, dtype=torch.bool)
        for row, eos_ids in banned:
            ban[row, list(eos_ids)] = True
        batch.ban_eos = ban.to(device, non_blocking=True)
    return batch


def apply_repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Transformers' rule: a seen token's logit is divided by the penalty if positive, else multiplied."""
    seen = logits.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, ids, seen)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits (ties with the k-th kept); 0 keeps all."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).view(-1, 1))
    return logits.masked_fill(logits < kth, _NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Drop the least likely tokens whose cumulative probability is at most ``1 - top_p``."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - top_p)
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than ``min_p`` times the most likely one."""
    probs = logits.softmax(dim=-1)
    floor = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < floor, _NEG_INF)


# splitmix64 constants as signed 64-bit integers (torch has no uint64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_STRIDE = 0xD1B54A32D192ED03 - (1 << 64)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seeds: torch.Tensor, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, vocab]`` uniforms in (0, 1), a pure function of (seed, offset, token id)."""
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = (seeds * _STRIDE + offsets).view(-1, 1) * _GOLDEN + token
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Pick one token per row of ``logits`` ``[B, V]`` (float32)."""
    if batch.penalty is not None:
        logits = apply_repetition_penalty(logits, batch.penalty_ids, batch.penalty)
    if batch.ban_eos is not None:
        logits = logits.masked_fill(batch.ban_eos, _NEG_INF)
    greedy = logits.argmax(dim=-1)
    if batch.do_sample is None:
        return greedy
    logits = logits / batch.temperature
    if batch.top_k is not None:
        logits = apply_top_k(logits, batch.top_k)
    if batch.top_p is not None:
        logits = apply_top_p(logits, batch.top_p)
    if batch.min_p is not None:
        logits = apply_min_p(logits, batch.min_p)
    # Exponential race (equivalent to Gumbel-max): argmax p_i / E_i with E_i ~ Exp(1).
    exp_noise = -torch.log(uniform_noise(batch.seeds, batch.offsets, logits.shape[-1]))
    drawn = (logits.softmax(dim=-1) / exp_noise).argmax(dim=-1)
    return torch.where(batch.do_sample, drawn, greedy)
