"""The attention of the models people run now, on the PyTorch backend, equal to stock `generate`
token for token (CPU, float32): sinks with alternating sliding layers (gpt-oss), chunked local
attention (Llama 4), MLA's compressed cache (DeepSeek, MiniCPM3), per-layer head sizes and shared
K/V (Gemma 4); also under chunked prefill, preemption and prefix caching, which cut a sequence's
steps and pages differently from a plain run."""

from __future__ import annotations

import pytest
import torch
from conftest import model_from_config, random_prompts, reference_generate
from transformers import AutoConfig

import hf_cb

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, initializer_range=0.2,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12)
FAMILIES = {  # model_type, what it exercises
    "gpt_oss": (dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"]), "sinks, alternating 8-token windows"),
    "llama4_text": (dict(head_dim=16, intermediate_size_mlp=128, num_local_experts=2, attention_chunk_size=8,
                         no_rope_layers=[1, 0], layer_types=["chunked_attention", "full_attention"]),
                    "8-token chunks beside a NoPE global layer"),
    "deepseek_v3": (dict(**MLA, q_lora_rank=None, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         first_k_dense_replace=1, n_group=1, topk_group=1), "MLA, MoE"),
    "deepseek_v2": (dict(**MLA, q_lora_rank=24, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         first_k_dense_replace=1, n_group=1, topk_group=1), "MLA with a q LoRA"),
    "minicpm3": (dict(**MLA, q_lora_rank=24), "MLA"),
    "gemma4_text": (dict(head_dim=16, global_head_dim=32, sliding_window=8, num_kv_shared_layers=2,
                         num_hidden_layers=4, hidden_size_per_layer_input=16,
                         layer_types=["sliding_attention", "full_attention"] * 2),
                    "per-layer head sizes, layers sharing K/V"),
}
PROMPTS = random_prompts(6, 3, 40, seed=71)
CONFIGS = {
    "default": None,
    "chunked_prefill": hf_cb.EngineConfig(max_num_batched_tokens=12, page_size=4),
    "preempting": hf_cb.EngineConfig(page_size=4, num_pages=20, max_num_seqs=4),
}


def family(model_type: str):
    kwargs, _ = FAMILIES[model_type]
    return model_from_config(AutoConfig.for_model(model_type, **{**COMMON, **kwargs}), seed=3)


@pytest.fixture(scope="module", params=list(FAMILIES))
def model_and_refs(request):
    model = family(request.param)
    refs = [reference_generate(model, p, max_new_tokens=10, do_sample=False, eos_token_id=None) for p in PROMPTS]
    return model, refs


@pytest.mark.parametrize("config", CONFIGS)
def test_greedy_equals_generate(model_and_refs, config):
    model, refs = model_and_refs
    outs = model.generate_batch_continuous(PROMPTS, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                           engine_config=CONFIGS[config], progress=False)
    assert [o.token_ids for o in outs] == refs
    engine = hf_cb.get_engine(model)
    assert engine.manager.num_free_pages == engine.manager.num_pages


def test_a_shared_prefix_is_found_in_the_cache(model_and_refs):
    """The pages of an MLA layer hold its latents, those of a chunked layer its own K/V: a prompt
    computed before is found again, and gives the same tokens."""
    model, refs = model_and_refs
    config = hf_cb.EngineConfig(page_size=4)
    first = model.generate_batch_continuous(PROMPTS[:1], max_new_tokens=10, do_sample=False, eos_token_id=None,
                                            engine_config=config, progress=False)[0]
    again = model.generate_batch_continuous(PROMPTS[:1], max_new_tokens=10, do_sample=False, eos_token_id=None,
                                            engine_config=config, progress=False)[0]
    assert first.token_ids == again.token_ids == refs[0]
    assert again.num_cached_tokens == (len(PROMPTS[0]) - 1) // 4 * 4 > 0


def test_what_the_pages_hold():
    """MLA's pages hold the compressed latent and the rotary key, not a per-head copy: for this
    config 16 + 8 numbers a token and layer, against 4 x (16 + 12) for expanded K/V."""
    model = family("deepseek_v3")
    shape = hf_cb.get_engine(model).shape
    assert [(s.kv_heads, s.k_dim, s.v_heads, s.v_dim, s.context) for s in shape.layers] == [(1, 16, 1, 8, True)] * 2
    gemma = hf_cb.get_engine(family("gemma4_text")).shape
    assert len({s.k_dim for s in gemma.layers}) == 2  # sliding layers of 16, a global one of 32
    sinks = hf_cb.get_engine(family("gpt_oss")).shape
    assert [(s.window, s.sinks) for s in sinks.layers] == [(8, True), (None, True)]
    llama4 = hf_cb.get_engine(family("llama4_text")).shape
    assert [s.chunk for s in llama4.layers] == [8, None]


def test_sinks_change_the_answer():
    """Without the sink column the softmax differs: the sinks are not a no-op in the test."""
    model = family("gpt_oss")
    ref = reference_generate(model, PROMPTS[1], max_new_tokens=10, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
    assert reference_generate(model, PROMPTS[1], max_new_tokens=10, do_sample=False, eos_token_id=None) != ref
