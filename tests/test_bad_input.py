"""Bad input gets a clear error before any work; afterwards the engine serves, no page leaked."""

import pytest
import torch
from conftest import VOCAB, random_prompts, reference_generate, tiny_model
from transformers import AutoModelForCausalLM, RecurrentGemmaConfig

import hf_cb

GOOD = random_prompts(3, 5, 30, seed=8)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=4)


def assert_still_serves(model):
    engine = hf_cb.get_engine(model)
    assert engine.manager.num_free_pages == engine.manager.num_pages
    assert not engine.scheduler.has_unfinished()
    outs = model.generate_batch_continuous(GOOD, max_new_tokens=4, do_sample=False)
    assert [o.token_ids for o in outs] == [reference_generate(model, p, max_new_tokens=4, do_sample=False) for p in GOOD]
    assert engine.manager.num_free_pages == engine.manager.num_pages


@pytest.mark.parametrize(
    "prompts, kwargs, error, message",
    [
        ([[5, 6], []], {}, ValueError, "prompt 4 is empty"),
        ([[5] * 500], {"max_new_tokens": 20}, ValueError, "exceeds the model's context of 512"),
        ([[5, 6]], {"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
        ([[5, 6]], {"max_new_tokens": -3}, ValueError, "max_new_tokens must be >= 1"),
        ([[5, 6], [7, VOCAB]], {}, ValueError, f"token id {VOCAB} outside the vocabulary"),
        ([[5, -1]], {}, ValueError, "token id -1 outside"),
        ([[5, 6]], {"eos_token_id": [2, VOCAB + 5]}, ValueError, f"stop token id {VOCAB + 5} is outside the vocabulary"),
        ([[5, 6]], {"num_beams": 2}, ValueError, "does not support this generation mode.*num_beams"),
        ([[5, 6]], {"max_new_tokens": [3, 4]}, ValueError, "max_new_tokens has 2 values for 4 inputs"),
        ([[5, 6]], {"not_an_argument": 1}, TypeError, "unexpected arguments.*not_an_argument"),
        (["text without tokenizer"], {}, ValueError, "need tokenizer"),
    ],
)
def test_bad_input_is_refused_and_engine_survives(model, prompts, kwargs, error, message):
    kwargs.setdefault("max_new_tokens", 4)
    good_and_bad = GOOD + prompts if not isinstance(prompts[0], str) else prompts
    with pytest.raises(error, match=message):
        model.generate_batch_continuous(good_and_bad, do_sample=False, **kwargs)
    assert_still_serves(model)


def test_request_larger_than_the_pool(model):
    small = hf_cb.EngineConfig(page_size=8, num_pages=4)
    with pytest.raises(ValueError, match="needs 5 pages .* the page pool has 4"):
        model.generate_batch_continuous([[5] * 30], max_new_tokens=8, engine_config=small)
    hf_cb.release(model)
    assert_still_serves(model)


def test_failure_mid_run_frees_everything(model, monkeypatch):
    engine = hf_cb.get_engine(model)
    real_launch, calls = engine.runner.launch, []

    def failing_launch(batch, prev):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return real_launch(batch, prev)

    monkeypatch.setattr(engine.runner, "launch", failing_launch)
    with pytest.raises(RuntimeError, match="simulated failure"):
        model.generate_batch_continuous(GOOD, max_new_tokens=10, do_sample=False)
    monkeypatch.undo()
    assert_still_serves(model)


def test_unsupported_model_is_refused_when_the_engine_is_built():
    # RecurrentGemma keeps its recurrent state in its own modules, not in the Cache.
    config = RecurrentGemmaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        lru_width=64, vocab_size=VOCAB, attention_window_size=16,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(hf_cb.ModelNotSupported, match="keeps its recurrent state outside the Cache"):
        model.generate_batch_continuous([[5, 6]], max_new_tokens=2)


def test_paged_cache_outside_a_step_is_an_error():
    cache = hf_cb.PagedCache.uniform(1, 2, 4, 2, 8, torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="only inside an hf_cb engine step"):
        cache.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), 0)


def test_hnd_pages_need_flashinfer(model):
    with pytest.raises(ValueError, match="kv_layout='HND' needs the FlashInfer backend"):
        model.generate_batch_continuous([[5, 6]], max_new_tokens=2, engine_config=hf_cb.EngineConfig(kv_layout="HND"))
    with pytest.raises(ValueError, match="unknown EngineConfig.kv_layout"):
        hf_cb.EngineConfig(kv_layout="NDH")
    assert model.generate_batch_continuous([[5, 6]], max_new_tokens=2)[0].token_ids  # the engine still serves


@pytest.mark.parametrize("field, value, message", [
    ("top_k", 2**64, "top_k is outside the 64-bit integer range"),
    ("top_k", True, "top_k must be an integer"),
    ("max_new_tokens", 2.0, "max_new_tokens must be an integer"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("top_p", "0.5", "top_p must be a finite number"),
    ("eos_token_ids", (2, 2**63), r"eos_token_ids\[1\] is outside the 64-bit integer range"),
    ("logprobs", 1.5, "logprobs must be an integer"),
    ("do_sample", 1, "do_sample must be a bool"),
])
def test_sampling_params_hold_only_what_a_step_can(field, value, message):
    """Every value the step's tensors take is checked when the request is made: an int past 64
    bits once failed the whole step, and every request in it."""
    kwargs = {"max_new_tokens": 4, field: value}
    with pytest.raises(ValueError, match=message):
        hf_cb.SamplingParams(**kwargs)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, "7", True])
def test_a_seed_past_64_bits_is_refused_at_admission(model, seed):
    engine = hf_cb.get_engine(model)
    with pytest.raises(ValueError, match="seed"):
        engine.add_request(GOOD[0], hf_cb.SamplingParams(4, do_sample=True), seed)
    online = hf_cb.OnlineEngine(model)
    try:
        with pytest.raises(ValueError, match="seed"):
            online.submit(GOOD[0], hf_cb.SamplingParams(4, do_sample=True), seed=seed)
    finally:
        online.shutdown()
    assert_still_serves(model)


def test_a_tiny_temperature_samples_the_most_likely_token(model):
    """Below 1e-5 (vLLM's epsilon) a temperature picks the argmax: 1e-300 is 0 in float32 and
    dividing the logits by it gave NaN."""
    greedy = model.generate_batch_continuous(GOOD, max_new_tokens=6, do_sample=False)
    tiny = model.generate_batch_continuous(GOOD, max_new_tokens=6, do_sample=True, temperature=1e-300, seed=3)
    assert [o.token_ids for o in tiny] == [o.token_ids for o in greedy]
