"""Prompt log-probabilities (``prompt_logprobs=k``, vLLM's): each prompt token's log-probability
under the tokens before it, its rank and the k most likely alternatives, equal to the plain
forward's log-softmax (CPU, float32) under chunked prefill, beside other requests, with a warm
prefix cache (a scored prompt is computed, not taken from it), on a model with recurrent state,
and through `OnlineEngine` streams."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts, tiny_model
from tiny_configs import tiny_model as tiny_architecture

import hf_cb
import hf_cb.worker.prompt_scoring as scoring
from hf_cb.entrypoints.online import OnlineEngine
from hf_cb.sampling.params import SamplingParams

PROMPTS = random_prompts(5, 1, 60, seed=3)
TOL = 1e-4


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=5)


def assert_scores(model, prompts, outs, k):
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for pos in range(1, len(prompt)):
            entry, row = out.prompt_logprobs[pos], logprobs[pos - 1]
            assert entry.token_id == prompt[pos]
            assert abs(entry.logprob - row[prompt[pos]].item()) < TOL
            assert entry.rank == int((row > row[prompt[pos]]).sum()) + 1
            top = row.topk(k)
            assert [t for t, _ in entry.top] == top.indices.tolist()
            assert all(abs(v - w) < TOL for (_, v), w in zip(entry.top, top.values.tolist()))


@pytest.mark.parametrize("config", [None, hf_cb.EngineConfig(max_num_batched_tokens=16, page_size=4)],
                         ids=["default", "chunked_prefill"])
def test_prompt_logprobs_equal_the_plain_forward(llama, config):
    outs = llama.generate_batch_continuous(PROMPTS, max_new_tokens=3, do_sample=False, prompt_logprobs=3,
                                           engine_config=config, progress=False)
    assert_scores(llama, PROMPTS, outs, 3)
    plain = llama.generate_batch_continuous(PROMPTS, max_new_tokens=3, do_sample=False, engine_config=config,
                                            progress=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]  # scoring changes no token
    assert all(o.prompt_logprobs is None for o in plain)


def test_a_scored_prompt_is_computed_not_taken_from_the_cache(llama):
    config = hf_cb.EngineConfig(page_size=4)
    prompt = PROMPTS[2]
    llama.generate_batch_continuous([prompt], max_new_tokens=2, do_sample=False, engine_config=config)
    cached = llama.generate_batch_continuous([prompt], max_new_tokens=2, do_sample=False, engine_config=config)[0]
    assert cached.num_cached_tokens > 0
    scored = llama.generate_batch_continuous([prompt], max_new_tokens=2, do_sample=False, prompt_logprobs=0,
                                             engine_config=config)[0]
    assert scored.num_cached_tokens == 0 and scored.token_ids == cached.token_ids
    assert_scores(llama, [prompt], [scored], 0)


def test_scores_are_computed_a_block_of_rows_at_a_time(llama, monkeypatch):
    monkeypatch.setattr(scoring, "SCORE_BLOCK", 7)
    outs = llama.generate_batch_continuous(PROMPTS, max_new_tokens=2, do_sample=False, prompt_logprobs=2,
                                           progress=False)
    assert_scores(llama, PROMPTS, outs, 2)


def test_a_model_with_recurrent_state():
    _, model = tiny_architecture("qwen3_5_text", "Qwen3_5ForCausalLM")
    # Two samples a prompt: a scoring sample is not a copy of its twin (`state_scheduler`).
    outs = model.generate_batch_continuous(PROMPTS, max_new_tokens=2, do_sample=True, prompt_logprobs=1,
                                           num_return_sequences=2, seed=3, progress=False,
                                           engine_config=hf_cb.EngineConfig(max_num_batched_tokens=16))
    assert_scores(model, [p for p in PROMPTS for _ in range(2)], outs, 1)


def test_streams_carry_them_on_their_first_output(llama):
    online = OnlineEngine(llama)
    try:
        stream = online.submit(PROMPTS[1], SamplingParams(4, prompt_logprobs=1))
        outs = list(stream)
        assert outs[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in outs[1:])
        assert_scores(llama, [PROMPTS[1]], outs[:1], 1)
    finally:
        online.shutdown()


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_bad_values_are_refused(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(4, prompt_logprobs=value)
