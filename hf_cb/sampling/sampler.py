"""Per-request sampling with Transformers' semantics, vectorised over the rows of a step.

The processors run in the order `generate` applies them: repetition penalty (then OpenAI's
presence and frequency penalties, over the generated tokens as in vLLM), the minimum-length
stop-token ban, then (sampling rows only) temperature, top-k, top-p and min-p. Random draws come
from a counter-based hash of (seed, output index, token id): a seeded request draws the same
numbers whatever else is in the batch, and nothing holds generator state. Log-probabilities are
those of the model's raw distribution (before any processor), as vLLM reports by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from hf_cb.sampling.params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """One step's sampling inputs, a row per sampled sequence; ``None`` means unused this step."""

    do_sample: torch.Tensor | None = None  # [B] bool
    temperature: torch.Tensor | None = None  # [B, 1]
    top_k: torch.Tensor | None = None  # [B] int64, 0 = off
    top_p: torch.Tensor | None = None  # [B, 1]
    min_p: torch.Tensor | None = None  # [B, 1]
    seeds: torch.Tensor | None = None  # [B] int64
    offsets: torch.Tensor | None = None  # [B] int64: index of the token being drawn
    penalty: torch.Tensor | None = None  # [B, 1]
    penalty_ids: torch.Tensor | None = None  # [B, L] int64, token ids seen so far (padded by repeats)
    presence: torch.Tensor | None = None  # [B, 1]
    frequency: torch.Tensor | None = None  # [B, 1]
    output_ids: torch.Tensor | None = None  # [B, L] int64, generated ids, padded with V (counted nowhere)
    ban_eos: torch.Tensor | None = None  # [B, V] bool, True where an EOS token is banned
    num_logprobs: int | None = None  # alternatives to report per row (the most any row asked)


def make_sampling_batch(
    params: Seq[SamplingParams],
    seeds: Seq[int],
    token_ids: Seq[list[int]],
    num_generated: Seq[int],
    vocab_size: int,
    device: torch.device,
) -> SamplingBatch:
    """Tensors for the rows of a step. ``token_ids`` are each row's prompt plus output so far;
    only rows with a penalty read them (others may hold tokens still pending on the device)."""
    sampling = [p.samples for p in params]
    banned = [(i, p.eos_token_ids) for i, p in enumerate(params) if num_generated[i] < p.min_new_tokens]

    def col(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype).view(-1, 1).to(device, non_blocking=True)

    def padded(rows: list[list[int]], pad: int | None) -> torch.Tensor:
        """Rows padded to one width with ``pad`` (None: the row's first id, a repeat)."""
        width = max(map(len, rows))
        rows = [r + [r[0] if pad is None else pad] * (width - len(r)) for r in rows]
        return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)

    batch = SamplingBatch()
    if any(sampling):
        batch.do_sample = torch.tensor(sampling, dtype=torch.bool).to(device, non_blocking=True)
        batch.temperature = col([p.temperature if p.samples else 1.0 for p in params])
        if any(p.samples and p.top_k > 0 for p in params):
            ks = [p.top_k if p.samples else 0 for p in params]
            batch.top_k = torch.tensor(ks, dtype=torch.int64).to(device, non_blocking=True)
        if any(p.samples and p.top_p < 1.0 for p in params):
            batch.top_p = col([p.top_p if p.samples else 1.0 for p in params])
        if any(p.samples and p.min_p > 0.0 for p in params):
            batch.min_p = col([p.min_p if p.samples else 0.0 for p in params])
        batch.seeds = torch.tensor(list(seeds), dtype=torch.int64).to(device, non_blocking=True)
        batch.offsets = torch.tensor(list(num_generated), dtype=torch.int64).to(device, non_blocking=True)
    if any(p.repetition_penalty != 1.0 for p in params):
        batch.penalty = col([p.repetition_penalty for p in params])
        # Unpenalised rows see token 0 with penalty 1: a no-op that reads no pending token.
        batch.penalty_ids = padded([ids if p.repetition_penalty != 1.0 else [0]
                                    for ids, p in zip(token_ids, params)], None)
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        batch.presence = col([p.presence_penalty for p in params])
        batch.frequency = col([p.frequency_penalty for p in params])
        outputs = [ids[len(ids) - n :] if (n and (p.presence_penalty or p.frequency_penalty)) else [vocab_size]
                   for ids, n, p in zip(token_ids, num_generated, params)]
        batch.output_ids = padded(outputs, vocab_size)
    if banned:
        ban = torch.zeros(len(params), vocab_size, dtype=torch.bool)
        for row, eos_ids in banned:
            ban[row, list(eos_ids)] = True
        batch.ban_eos = ban.to(device, non_blocking=True)
    requested = [p.logprobs for p in params if p.logprobs is not None]
    batch.num_logprobs = max(requested) if requested else None
    return batch


def apply_repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Transformers' rule: a seen token's logit is divided by the penalty if positive, else multiplied."""
    seen = logits.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, ids, seen)


def apply_presence_frequency(
    logits: torch.Tensor, output_ids: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's rule, as vLLM applies it: subtract ``frequency`` per earlier occurrence of a token
    in the output and ``presence`` once if it occurred at all."""
    batch, vocab = logits.shape
    counts = torch.zeros(batch, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=logits.dtype))
    counts = counts[:, :vocab]
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


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
    if batch.output_ids is not None:
        logits = apply_presence_frequency(logits, batch.output_ids, batch.presence, batch.frequency)
    if batch.ban_eos is not None:
        logits = logits.masked_fill(batch.ban_eos, _NEG_INF)
    greedy = greedy_tokens(logits)
    if batch.do_sample is None:
        return greedy
    logits = logits / batch.temperature
    if batch.top_k is not None:
        logits = apply_top_k(logits, batch.top_k)
    if batch.top_p is not None:
        logits = apply_top_p(logits, batch.top_p)
    if batch.min_p is not None:
        logits = apply_min_p(logits, batch.min_p)
    return torch.where(batch.do_sample, draw(logits, batch.seeds, batch.offsets), greedy)


def argmax_parts(rows: int, vocab: int) -> int:
    """How many parts `greedy_tokens` splits each row into: a plain argmax reduces a row in one
    block, so a few rows keep a few SMs busy (H200, 128k vocabulary, in a graph: 27.5 us for
    8 to 128 rows); in 128 parts 32 rows took 14.9 us, in 64 parts 64 rows 18.4 us
    (`benchmarks/decode_gemms.py`). 1: no split (more rows, or no such divisor of ``vocab``)."""
    parts = 128 if rows <= 32 else 64 if rows <= 64 else 1
    parts = math.gcd(vocab, parts)
    return parts if parts >= 16 else 1


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax of ``logits`` ``[B, V]``, as ``argmax`` picks it (the first index of
    the maximum), in `argmax_parts` parts."""
    parts = argmax_parts(*logits.shape)
    return logits.argmax(dim=-1) if parts == 1 else two_pass_argmax(logits, parts)


def two_pass_argmax(logits: torch.Tensor, parts: int) -> torch.Tensor:
    """``logits.argmax(-1)`` as the maximum of each of ``parts`` equal parts of a row (``parts``
    divides V), then the first part holding the largest: ties go to the first index, as argmax's."""
    rows, vocab = logits.shape
    best, index = logits.reshape(rows, parts, vocab // parts).max(dim=-1)
    part = best.argmax(dim=-1)
    return index.gather(1, part[:, None])[:, 0] + part * (vocab // parts)


def _draw(logits: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Gumbel-max: argmax(logits + G) with G = -log(-log U), U from `uniform_noise`. The same
    draw as the exponential race argmax p_i / E_i with E_i = -log U_i (take logs; the softmax's
    normaliser is one constant per row), without the softmax."""
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, offsets, logits.shape[-1])))
    return (logits + gumbel).argmax(dim=-1)


_compiled_draw = None


def draw(logits: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One sampled token per row of (processed) ``logits``. On CUDA the hash, the noise and the
    argmax are one compiled kernel: eager, they were a dozen passes over ``[B, V]`` int64, about
    10 ms a step for 1024 rows of a 128k vocabulary (W6 on an H200)."""
    global _compiled_draw
    if not logits.is_cuda:
        return _draw(logits, seeds, offsets)
    if _compiled_draw is None:
        _compiled_draw = torch.compile(_draw, dynamic=True)
    return _compiled_draw(logits, seeds, offsets)


def is_greedy(batch: SamplingBatch) -> bool:
    """Whether plain argmax of the raw logits picks every row's token."""
    return batch.do_sample is None and batch.penalty is None and batch.output_ids is None and batch.ban_eos is None


def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """``[S, 1 + 2k]`` float32 rows: the chosen token's log-probability, then the ids (exact in
    float32 below 2**24) and log-probabilities of the ``k`` most likely tokens. One tensor, so
    the host reads it back with one copy."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.view(-1, 1))
    if k == 0:
        return chosen
    top = logprobs.topk(k, dim=-1)
    return torch.cat([chosen, top.indices.float(), top.values], dim=1)
