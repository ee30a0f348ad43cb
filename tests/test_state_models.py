"""Hybrid linear-attention and state-space models (Qwen3.5, Qwen3-Next, Mamba, Jamba, ...) on a
per-sequence state pool: equal to stock `generate` token for token (CPU, float32) under chunked
prefill and preemption; ``n`` samples copying one prefilled state equal to samples computed
alone; aborts; the slot pool's lifecycle and size; the families hf_cb refuses, with why."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from conftest import random_prompts, reference_generate
from tiny_configs import architectures, tiny_model

import hf_cb
from hf_cb.entrypoints.online import OnlineEngine
from hf_cb.paged_cache import PagedCache
from hf_cb.sampling.params import SamplingParams, sample_seed

# The hybrid and state-space families of the installed Transformers (the list), each as
# its tiny config in tests/tiny_configs.py builds it.
FAMILIES = ["qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe", "qwen3_next", "olmo_hybrid", "kimi_linear",
            "lfm2", "lfm2_moe", "granitemoehybrid", "falcon_h1", "bamba", "nemotron_h", "jamba", "mamba", "mamba2",
            "falcon_mamba", "zamba", "zamba2"]
FAMILIES = [f for f in FAMILIES if f in architectures()]
# Families whose multi-token forward starts a fresh state (Mamba's selective scan, Jamba's and
# Zamba's Mamba-1 layers): each prompt is prefilled in one step.
WHOLE_PREFILL = {"jamba", "mamba", "falcon_mamba", "zamba"}
REFUSED = {  # what the model does that hf_cb cannot serve without patching it
    "minimax": "MiniMax uses cache of its own",
    "recurrent_gemma": "keeps its recurrent state outside the Cache",
}
PROMPTS = random_prompts(6, 3, 40, seed=71)
CONFIGS = {
    "default": None,
    "chunked_prefill": hf_cb.EngineConfig(max_num_batched_tokens=12, page_size=4),
    "preempting": hf_cb.EngineConfig(page_size=4, num_pages=20, max_num_seqs=4),
}


def build(model_type: str):
    return tiny_model(model_type, architectures()[model_type])[1]


@pytest.fixture(scope="module", params=FAMILIES)
def model_and_refs(request):
    model = build(request.param)
    refs = [reference_generate(model, p, max_new_tokens=10, do_sample=False, eos_token_id=None) for p in PROMPTS]
    return request.param, model, refs


@pytest.mark.parametrize("config", CONFIGS)
def test_greedy_equals_generate(model_and_refs, config):
    model_type, model, refs = model_and_refs
    outs = model.generate_batch_continuous(PROMPTS, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                           engine_config=CONFIGS[config], progress=False)
    assert [o.token_ids for o in outs] == refs
    engine = hf_cb.get_engine(model)
    assert engine.shape.stateful and engine.chunked_prefill == (model_type not in WHOLE_PREFILL)
    assert engine.manager.num_free_pages == engine.manager.num_pages
    assert engine.manager.num_free_rows == engine.config.max_num_seqs  # every state slot back
    if config == "chunked_prefill":  # chunks where the model continues a state, whole prompts elsewhere
        assert (engine.config.max_num_batched_tokens == 12) == engine.chunked_prefill
    if config == "preempting":
        assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "falcon_h1", "mamba", "lfm2"])
@pytest.mark.parametrize("prompt_len", [9, 12])  # the fork point inside a page, and at its end + 1
def test_n_samples_copy_the_prompts_state(model_type, prompt_len):
    """The n samples of a prompt prefill it once: the others copy the state (and K/V) after all
    but its last token, and draw the same tokens as each sample computed alone with its seed."""
    model = build(model_type)
    prompt, n, new = random_prompts(1, prompt_len, prompt_len, seed=8)[0], 4, 6
    config = hf_cb.EngineConfig(page_size=4)
    kwargs = dict(max_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, num_return_sequences=n, seed=11,
                  progress=False, engine_config=config)
    shared = model.generate_batch_continuous([prompt], **kwargs)
    engine = hf_cb.get_engine(model, config)
    # The prompt once, less its last token; then each sample feeds that token and its own.
    assert engine.stats.tokens == (prompt_len - 1) + n * new
    assert [o.num_cached_tokens for o in shared] == [0] + [prompt_len - 1] * (n - 1)
    params = SamplingParams(new, do_sample=True, temperature=1.0, top_k=0)
    alone = []
    for j in range(n):  # one at a time: nothing to fork
        seq = engine.add_request(prompt, params, seed=sample_seed(11, j))
        engine.run([seq])
        alone.append(seq.output_ids)
    assert [o.token_ids for o in shared] == alone
    assert len({tuple(t) for t in alone}) > 1
    assert engine.manager.num_free_pages == engine.manager.num_pages


def test_abort_frees_the_slot_and_others_finish():
    model = build("qwen3_5_text")
    refs = [reference_generate(model, p, max_new_tokens=12, do_sample=False, eos_token_id=None) for p in PROMPTS]
    online = OnlineEngine(model, hf_cb.EngineConfig(page_size=4, max_num_seqs=3))
    try:
        doomed = [online.submit(p, SamplingParams(300)) for p in PROMPTS[:2]]
        kept = [online.submit(p, SamplingParams(12)) for p in PROMPTS[2:]]
        assert next(iter(doomed[0])).token_ids  # it runs...
        for s in doomed:
            s.abort()
        for s, ref in zip(kept, refs[2:]):
            assert sum((o.token_ids for o in s), []) == ref
        for s in doomed:
            assert list(s)[-1].finish_reason == "abort"
        engine = online.engine
        deadline = time.monotonic() + 5
        while engine.manager.num_free_rows < engine.config.max_num_seqs and time.monotonic() < deadline:
            time.sleep(0.02)  # the aborts land within a step
        assert engine.manager.num_free_rows == engine.config.max_num_seqs
        assert engine.manager.num_free_pages == engine.manager.num_pages
    finally:
        online.shutdown()


def test_the_state_pool_caps_max_num_seqs(caplog):
    """One slot per running sequence, in the memory budget: a budget that holds few slots caps
    max_num_seqs, says so at start-up, and the outputs stay exact."""
    model = build("qwen3_5_text")
    slot = PagedCache.bytes_per_slot(hf_cb.get_engine(model).shape.states)
    hf_cb.release(model)
    config = hf_cb.EngineConfig(page_size=4, cpu_kv_cache_bytes=2 * 3 * slot)  # half for 3 slots
    with caplog.at_level(logging.INFO, logger="hf_cb"):
        outs = model.generate_batch_continuous(PROMPTS, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                               engine_config=config, progress=False)
    engine = hf_cb.get_engine(model, config)
    assert engine.config.max_num_seqs == 3 and engine.cache.state_layers[0].conv_pool[0].shape[0] == 3
    assert "max_num_seqs 256 -> 3" in caplog.text
    assert engine.num_pages * engine.page_bytes <= config.cpu_kv_cache_bytes - 3 * slot
    refs = [reference_generate(model, p, max_new_tokens=6, do_sample=False, eos_token_id=None) for p in PROMPTS]
    assert [o.token_ids for o in outs] == refs


def test_what_the_state_pool_holds():
    """Each layer's states as Transformers' cache layer holds them for one sequence: Gated
    DeltaNet's conv window and heads x key x value state, Mamba's, LFM2's conv alone; hybrid
    layers have pages and states, MLP layers neither."""
    qwen = hf_cb.get_engine(build("qwen3_5_text"))
    spec = qwen.shape.states[0]
    config = qwen.model.config
    conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim + (
        config.linear_num_value_heads * config.linear_value_head_dim)
    assert spec.conv == ((conv_dim, config.linear_conv_kernel_dim),)
    assert spec.recurrent == ((config.linear_num_value_heads, config.linear_key_head_dim,
                               config.linear_value_head_dim),)
    assert [s is None for s in qwen.shape.layers] == [t == "linear_attention" for t in config.layer_types]
    assert hf_cb.get_engine(build("lfm2")).shape.states[0].recurrent == (None,)
    falcon = hf_cb.get_engine(build("falcon_h1")).shape
    assert all(a is not None and s is not None for a, s in zip(falcon.layers, falcon.states))
    nemotron = hf_cb.get_engine(build("nemotron_h"))
    kinds = [(a is not None, s is not None) for a, s in zip(nemotron.shape.layers, nemotron.shape.states)]
    assert (False, False) in kinds and type(nemotron.cache.layers[kinds.index((False, False))]).__name__ == "DummyLayer"
    mamba = hf_cb.get_engine(build("mamba"))
    assert not mamba.shape.attention and mamba.page_bytes == 0 and mamba.max_model_len == 1 << 16


def test_states_change_the_answer():
    """Zeroing the state between steps changes the tokens: the test above would see a pool that
    lost it."""
    model = build("qwen3_5_text")
    ref = reference_generate(model, PROMPTS[1], max_new_tokens=10, do_sample=False, eos_token_id=None)
    engine = hf_cb.get_engine(model)
    original = engine.cache.bound

    def amnesiac(slots, fresh):
        return original(slots, True)

    engine.cache.bound = amnesiac
    try:
        out = model.generate_batch_continuous([PROMPTS[1]], max_new_tokens=10, do_sample=False, eos_token_id=None,
                                              progress=False)[0]
    finally:
        del engine.cache.bound
    assert out.token_ids != ref


@pytest.mark.parametrize("model_type", [t for t in REFUSED if t in architectures()])
def test_refused_families_say_why(model_type):
    model = build(model_type)
    with pytest.raises(hf_cb.ModelNotSupported, match=REFUSED[model_type]):
        hf_cb.get_engine(model)
    assert model.config._attn_implementation != "hf_cb"


def test_outside_a_step_the_model_is_untouched():
    """After the engine is released stock generate runs as before (its own DynamicCache)."""
    model = build("qwen3_5_text")
    before = reference_generate(model, PROMPTS[0], max_new_tokens=8, do_sample=False, eos_token_id=None)
    model.generate_batch_continuous(PROMPTS[:2], max_new_tokens=4, do_sample=False, progress=False)
    hf_cb.release(model)
    with torch.no_grad():
        assert reference_generate(model, PROMPTS[0], max_new_tokens=8, do_sample=False, eos_token_id=None) == before
