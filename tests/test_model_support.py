"""Which models hf_cb serves is decided by a probe step, not by `_supports_attention_backend`."""

import pytest
import torch
from transformers import BioGptConfig, GPTJConfig, StableLmConfig

import hf_cb
from conftest import _COMMON, VOCAB, model_from_config, random_prompts, reference_generate, tiny_model
from hf_cb.model_support import add_step_hooks, probe_attention

# BioGPT has no GQA: every head keeps its K/V.
_MHA = {k: v for k, v in _COMMON.items() if k != "num_key_value_heads"}
# Neither class sets `_supports_attention_backend`; StableLM's decoder layers also drop the
# keyword arguments of model(...), so the step reaches its attention only through the hooks.
CONFIGS = {
    "stablelm": (lambda: StableLmConfig(**_COMMON, qk_layernorm=True, partial_rotary_factor=0.5), True),
    "stablelm-parallel": (lambda: StableLmConfig(**_COMMON, use_parallel_residual=True), True),
    "biogpt": (lambda: BioGptConfig(**_MHA), False),
}
PROMPTS = random_prompts(4, 3, 30, seed=5)


def hooks_on(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", CONFIGS)
def test_models_without_the_flag_equal_stock_generate(name):
    make_config, needs_hooks = CONFIGS[name]
    model = model_from_config(make_config())
    assert not type(model)._supports_attention_backend
    assert probe_attention(model) is needs_hooks
    outs = model.generate_batch_continuous(PROMPTS, max_new_tokens=8, do_sample=False)
    assert (hooks_on(model) > 0) is needs_hooks  # the engine installed the hooks it needs
    # Stock generate with the engine's hooks on: outside an engine step they do nothing.
    expected = [reference_generate(model, p, max_new_tokens=8, do_sample=False) for p in PROMPTS]
    assert [o.token_ids for o in outs] == expected
    hf_cb.release(model)
    assert hooks_on(model) == 0  # release takes them off


def test_probe_leaves_the_model_as_it_was():
    model = model_from_config(CONFIGS["stablelm"][0]())
    model.train()
    model.model.norm.eval()
    before = model.config._attn_implementation
    assert probe_attention(model)  # the path that adds and removes hooks
    assert model.config._attn_implementation == before
    assert hooks_on(model) == 0
    assert model.training and not model.model.norm.training
    assert not hasattr(model, "_hf_cb_engine")


def assert_refused(model, message: str) -> None:
    before = model.config._attn_implementation
    with pytest.raises(hf_cb.ModelNotSupported, match=message):
        probe_attention(model)
    assert model.config._attn_implementation == before
    assert hooks_on(model) == 0


def test_model_whose_attention_bypasses_the_interface_is_refused():
    # GPT-J's attention is its own code: Transformers keeps its implementation (a warning).
    config = GPTJConfig(vocab_size=VOCAB, n_positions=512, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    assert_refused(
        model_from_config(config),
        "GPTJForCausalLM cannot switch its attention implementation to 'hf_cb': its attention does "
        "not go through transformers' AttentionInterface",
    )


def test_layer_that_skips_the_cache_is_refused(monkeypatch):
    model = tiny_model("llama")
    attention = model.model.layers[1].self_attn
    monkeypatch.setattr(attention, "forward", lambda hidden_states, *a, **k: (torch.zeros_like(hidden_states), None))
    assert_refused(
        model, r"LlamaForCausalLM: 1 of 2 attention layers did not write their K/V through the Cache \(layers \[1\]\)"
    )


def test_positions_not_taken_from_position_ids_are_refused(monkeypatch):
    model = model_from_config(BioGptConfig(**_MHA))
    inner = model.biogpt.forward
    monkeypatch.setattr(model.biogpt, "forward", lambda *a, position_ids=None, **k: inner(*a, **k))
    assert_refused(model, "BioGptForCausalLM computes different logits through hf_cb")


def test_every_conftest_model_passes_the_probe():
    for name in ("llama", "gemma2", "gemma3"):
        assert probe_attention(tiny_model(name)) is False
