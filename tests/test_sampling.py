"""Sampling: Transformers' processors as the oracle, seeded reproducibility, batch invariance."""

import pytest
import torch
from conftest import random_prompts, reference_generate, tiny_model
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import hf_cb
from hf_cb.sampling.params import SamplingParams
from hf_cb.sampling.sampler import make_sampling_batch, sample, uniform_noise

V = 64


def hf_allowed(logits, p: SamplingParams):
    """The tokens Transformers' warpers leave, for one row."""
    scores = logits[None].clone()
    for warper in [
        TemperatureLogitsWarper(p.temperature) if p.temperature != 1.0 else None,
        TopKLogitsWarper(p.top_k) if p.top_k else None,
        TopPLogitsWarper(p.top_p) if p.top_p < 1.0 else None,
        MinPLogitsWarper(p.min_p) if p.min_p > 0 else None,
    ]:
        if warper is not None:
            scores = warper(None, scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


FILTERS = [
    SamplingParams(8, do_sample=True, top_k=5),
    SamplingParams(8, do_sample=True, top_p=0.6),
    SamplingParams(8, do_sample=True, min_p=0.3),
    SamplingParams(8, do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.05),
    SamplingParams(8, do_sample=True, temperature=2.0, top_p=0.3),
]


def test_filters_never_emit_an_excluded_token():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(len(FILTERS), V, generator=gen) * 3
        allowed = [hf_allowed(logits[i], p) for i, p in enumerate(FILTERS)]
        for draw in range(25):
            batch = make_sampling_batch(
                FILTERS, [trial * 100 + draw] * len(FILTERS), [[1]] * len(FILTERS), [draw] * len(FILTERS),
                V, torch.device("cpu"),
            )
            tokens = sample(logits, batch).tolist()
            for row, tok in enumerate(tokens):
                assert tok in allowed[row], (row, FILTERS[row])


def test_draws_follow_the_distribution():
    """Frequencies of 20k seeded draws match softmax(logits / T) (Gumbel-max is exact)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = [SamplingParams(1, do_sample=True, temperature=0.8)] * 20000
    batch = make_sampling_batch(params, range(20000), [[0]] * 20000, [0] * 20000, 6, torch.device("cpu"))
    counts = torch.bincount(sample(logits.expand(20000, 6).clone(), batch), minlength=6).double()
    expected = torch.softmax(logits / 0.8, -1).double() * 20000
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 25  # 5 degrees of freedom: p ~ 1e-4


def test_noise_is_a_pure_function_of_seed_offset_and_token():
    u = uniform_noise(torch.tensor([7, 7, 8]), torch.tensor([0, 1, 0]), 1000)
    again = uniform_noise(torch.tensor([8, 7]), torch.tensor([0, 0]), 1000)
    assert torch.equal(u[0], again[1]) and torch.equal(u[2], again[0])
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02


def test_repetition_penalty_matches_transformers():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, V, generator=gen)
    seen = [[1, 5, 5, 9], [3], [2, 4, 6, 8, 10]]
    params = [SamplingParams(4, repetition_penalty=r) for r in (1.3, 0.7, 1.0)]
    batch = make_sampling_batch(params, [0, 0, 0], seen, [0, 0, 0], V, torch.device("cpu"))
    from hf_cb.sampling.sampler import apply_repetition_penalty

    ours = apply_repetition_penalty(logits, batch.penalty_ids, batch.penalty)
    for row, (ids, p) in enumerate(zip(seen, params)):
        ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([ids]), logits[row : row + 1].clone())
        assert torch.allclose(ours[row], ref[0])


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=3)


def test_seeded_runs_repeat_and_ignore_the_rest_of_the_batch(llama):
    prompts = random_prompts(6, 3, 40, seed=4)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.95, top_k=0)
    first = llama.generate_batch_continuous(prompts, seed=list(range(6)), **kw)
    again = llama.generate_batch_continuous(prompts, seed=list(range(6)), **kw)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    # The same request alone, or among other requests in a different order, draws the same tokens.
    alone = llama.generate_batch_continuous([prompts[3]], seed=3, **kw)
    shuffled = llama.generate_batch_continuous(
        [prompts[5], prompts[3], prompts[0]], seed=[5, 3, 0], engine_config=hf_cb.EngineConfig(max_num_seqs=2), **kw
    )
    assert alone[0].token_ids == first[3].token_ids == shuffled[1].token_ids
    other = llama.generate_batch_continuous([prompts[3]], seed=99, **kw)
    assert other[0].token_ids != first[3].token_ids


def test_unseeded_runs_follow_torch_manual_seed(llama):
    prompts = random_prompts(3, 3, 20, seed=5)
    torch.manual_seed(11)
    a = llama.generate_batch_continuous(prompts, max_new_tokens=8, do_sample=True, top_k=0)
    torch.manual_seed(11)
    b = llama.generate_batch_continuous(prompts, max_new_tokens=8, do_sample=True, top_k=0)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_num_return_sequences_draw_distinct_samples(llama):
    outs = llama.generate_batch_continuous(
        [[5, 6, 7]], max_new_tokens=10, do_sample=True, top_k=0, temperature=1.5, seed=1, num_return_sequences=3
    )
    assert len(outs) == 3 and len({tuple(o.token_ids) for o in outs}) == 3


def test_greedy_repetition_penalty_and_min_new_tokens_equal_generate(llama):
    prompts = random_prompts(5, 4, 30, seed=6)
    outs = llama.generate_batch_continuous(prompts, max_new_tokens=10, do_sample=False, repetition_penalty=1.5)
    for p, o in zip(prompts, outs):
        assert o.token_ids == reference_generate(llama, p, max_new_tokens=10, do_sample=False, repetition_penalty=1.5)
    # Make EOS the token greedy decoding would emit first: min_new_tokens must hold it back.
    prompt = prompts[0]
    first = reference_generate(llama, prompt, max_new_tokens=1, do_sample=False)[0]
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=first, pad_token_id=0)
    assert llama.generate_batch_continuous([prompt], **kw)[0].token_ids == [first]
    assert llama.generate_batch_continuous([prompt], **kw)[0].finish_reason == "stop"
    ours = llama.generate_batch_continuous([prompt], min_new_tokens=4, **kw)[0].token_ids
    assert first not in ours[:4]
    assert ours == reference_generate(llama, prompt, min_new_tokens=4, **kw)


@pytest.mark.parametrize("rows,vocab", [(3, 1024), (32, 4096), (64, 4096), (200, 4096), (8, 1001)])
def test_greedy_tokens_is_argmax_with_ties(rows, vocab):
    # The two-pass argmax of a few rows must pick argmax's token, the first of tied maxima,
    # whether the tie is within one part or across parts.
    from hf_cb.sampling.sampler import argmax_parts, greedy_tokens

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g)
    top = logits.max() + 1
    logits[0, [5, 6]] = top  # one part
    logits[1, [vocab - 1, 9]] = top  # across parts: the earlier index wins
    if rows > 2:
        logits[2, :] = 0.0  # a row of equal values: index 0
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert (argmax_parts(rows, vocab) > 1) == (rows <= 64 and vocab % 16 == 0)
