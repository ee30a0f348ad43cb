"""Which models hf_cb serves is decided by a probe step, not by `_supports_attention_backend`."""

import pytest
import torch
import torch.nn.functional as F
from conftest import _COMMON, VOCAB, model_from_config, random_prompts, reference_generate, tiny_model
from torch import nn
from transformers import BioGptConfig, LlamaConfig, LlamaForCausalLM, StableLmConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import hf_cb
from hf_cb.attention.backends.torch_backend import TorchAttentionStep
from hf_cb.attention.context import in_step
from hf_cb.model_support.probe import probe_attention

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
    assert probe_attention(model).needs_hooks is needs_hooks
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
    assert probe_attention(model).needs_hooks  # the path that adds and removes hooks
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


class OwnAttention(nn.Module):
    """Attention in its own code, not through the attention interface (as GPT-J's was up to
    Transformers 5.23). Transformers tells such modules apart by their source."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        a, shape = self.inner, (*hidden_states.shape[:-1], -1, self.inner.head_dim)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return a.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None


class OwnAttentionLlama(LlamaForCausalLM):
    # Transformers caches its verdict on the class, which a subclass would inherit from Llama.
    _can_set_attn_implementation_cached_value = None

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.self_attn = OwnAttention(layer.self_attn)


def test_model_whose_attention_bypasses_the_interface_is_refused():
    # Transformers keeps such a model's implementation (with a warning).
    model = OwnAttentionLlama(LlamaConfig(**_COMMON)).eval()
    ids = torch.tensor([[5, 6, 7]])
    assert model(ids).logits.shape == (1, 3, VOCAB)  # a working model, just not one hf_cb can serve
    assert_refused(
        model,
        "OwnAttentionLlama cannot switch its attention implementation to 'hf_cb': its attention does "
        "not go through transformers' AttentionInterface",
    )


def test_layer_that_skips_the_attention_interface_is_refused(monkeypatch):
    model = tiny_model("llama")
    attention = model.model.layers[1].self_attn
    monkeypatch.setattr(attention, "forward", lambda hidden_states, *a, **k: (torch.zeros_like(hidden_states), None))
    assert_refused(
        model, r"LlamaForCausalLM: 1 of 2 attention layers did not call the attention interface \(layers \[1\]\)"
    )


def test_layer_that_attends_twice_in_one_step_is_refused(monkeypatch):
    model = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    once = attention.forward
    monkeypatch.setattr(attention, "forward", lambda *a, **k: (once(*a, **k), once(*a, **k))[1])
    # Run twice, the layer also updates a plain cache twice: the recording forward already fails.
    assert_refused(model, r"LlamaForCausalLM(: attention layers \[0\] wrote K/V more than once in one step| failed "
                          r"a forward with hf_cb's attention function)")


def test_positions_not_taken_from_position_ids_are_refused(monkeypatch):
    model = model_from_config(BioGptConfig(**_MHA))
    inner = model.biogpt.forward
    monkeypatch.setattr(model.biogpt, "forward", lambda *a, position_ids=None, **k: inner(*a, **k))
    assert_refused(model, "BioGptForCausalLM computes different logits through hf_cb")


def test_every_conftest_model_passes_the_probe():
    for name in ("llama", "gemma2", "gemma3"):
        assert probe_attention(tiny_model(name)).needs_hooks is False


# -- failures that are not the model's: they propagate as raised, and are not retried ------------


def assert_left_as_it_was(model, before: str) -> None:
    assert model.config._attn_implementation == before
    assert hooks_on(model) == 0
    assert not hasattr(model, "_hf_cb_engine")


@pytest.mark.parametrize("entry", [probe_attention, hf_cb.get_engine], ids=["probe", "get_engine"])
@pytest.mark.parametrize("method", ["write_kv", "attend"])
def test_error_in_hf_cbs_backend_propagates_unchanged(monkeypatch, method, entry):
    bug = RuntimeError("a bug in hf_cb's backend")
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(method)
        raise bug

    monkeypatch.setattr(TorchAttentionStep, method, failing)
    model = tiny_model("llama")
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError) as raised:
        entry(model)
    assert raised.value is bug  # not a ModelNotSupported around it
    assert raised.traceback[-1].name == "failing"  # its traceback still reaches where it was raised
    assert calls == [method]  # the probe step ran once: no retry with step hooks
    assert_left_as_it_was(model, before)


def test_models_handler_of_a_backend_error_propagates(monkeypatch):
    """A model that catches hf_cb's error and raises its own: still hf_cb's failure, not the model's."""
    bug = RuntimeError("a bug in hf_cb's backend")

    def failing(self, *args, **kwargs):
        raise bug

    monkeypatch.setattr(TorchAttentionStep, "attend", failing)
    model = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    inner = attention.forward

    def forward(*args, **kwargs):
        try:
            return inner(*args, **kwargs)
        except RuntimeError as error:
            raise ValueError("attention failed") from error

    monkeypatch.setattr(attention, "forward", forward)
    with pytest.raises(ValueError, match="attention failed") as raised:
        probe_attention(model)
    assert not isinstance(raised.value, hf_cb.ModelNotSupported) and raised.value.__cause__ is bug


DEVICE_FAULTS = [
    pytest.param(lambda: torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
                 id="AcceleratorError", marks=pytest.mark.skipif(not hasattr(torch, "AcceleratorError"),
                                                                 reason="torch < 2.8")),
    pytest.param(lambda: RuntimeError("CUDA error: an illegal memory access was encountered"), id="older-torch"),
    pytest.param(lambda: torch.OutOfMemoryError("CUDA out of memory"), id="out-of-memory"),
]


def fail_in_steps(monkeypatch, model, error: BaseException) -> list[BaseException]:
    """Make the model's own code (layer 1's MLP) raise ``error`` inside engine steps only, so
    that the model's plain forward, the probe's reference, runs; returns what it raised."""
    mlp = model.model.layers[1].mlp
    inner, raised = mlp.forward, []

    def forward(x):
        if in_step():
            raised.append(error)
            raise error
        return inner(x)

    monkeypatch.setattr(mlp, "forward", forward)
    return raised


@pytest.mark.parametrize("make_fault", DEVICE_FAULTS)
def test_device_fault_in_the_models_forward_propagates_unchanged(monkeypatch, make_fault):
    model = tiny_model("llama")
    fault = make_fault()
    raised = fail_in_steps(monkeypatch, model, fault)
    before = model.config._attn_implementation
    with pytest.raises(type(fault)) as caught:
        probe_attention(model)
    assert caught.value is fault
    assert caught.traceback[-1].name == "forward"  # raised in the MLP's forward, traceback intact
    assert len(raised) == 1  # not retried with step hooks
    assert_left_as_it_was(model, before)


def test_error_in_the_models_own_code_is_a_refusal(monkeypatch):
    """The contrast: what the model's code raises on hf_cb's inputs is the model's, and refused
    (after a retry with step hooks, which some models need)."""
    model = tiny_model("llama")
    raised = fail_in_steps(monkeypatch, model, RuntimeError("shape mismatch in the MLP"))
    assert_refused(
        model, r"LlamaForCausalLM failed a probe step through hf_cb's attention after 2 of 2 attention layers called "
        r"the attention interface with hf_cb's step: RuntimeError: shape mismatch in the MLP",
    )
    assert len(raised) == 2  # without hooks, then with them
