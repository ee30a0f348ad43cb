"""Model level, CPU float32, greedy: hf_cb equals stock `model.generate` token for token."""

import random

import pytest
import torch
from conftest import MODEL_CONFIGS, random_prompts, reference_generate, tiny_model

import hf_cb

N_PROMPTS = 24
PROMPTS = random_prompts(N_PROMPTS, 1, 200, seed=1)
PROMPTS[0], PROMPTS[1] = [5], [7] * 200  # the extremes
MAX_NEW = [random.Random(2).randint(1, 24) for _ in PROMPTS]

ENGINES = {
    "default": hf_cb.EngineConfig(),
    # fewer slots than requests, chunked prefill, and a pool so small that requests are preempted
    "tight": hf_cb.EngineConfig(page_size=8, num_pages=30, max_num_seqs=6, max_num_batched_tokens=48),
    "tight-sync": hf_cb.EngineConfig(
        page_size=8, num_pages=30, max_num_seqs=6, max_num_batched_tokens=48, async_scheduling=False
    ),
}

_refs: dict[str, tuple] = {}


def model_and_refs(name):
    if name not in _refs:
        model = tiny_model(name)
        refs = [
            reference_generate(model, p, max_new_tokens=n, do_sample=False)
            for p, n in zip(PROMPTS, MAX_NEW)
        ]
        _refs[name] = (model, refs)
    return _refs[name]


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_generate_batch_continuous_equals_generate(name, engine):
    model, refs = model_and_refs(name)
    outs = model.generate_batch_continuous(
        PROMPTS, max_new_tokens=MAX_NEW, do_sample=False, engine_config=ENGINES[engine]
    )
    assert [o.token_ids for o in outs] == refs
    for o, ref, n, p in zip(outs, refs, MAX_NEW, PROMPTS):
        assert o.prompt_ids == p
        assert o.finish_reason == ("stop" if ref[-1] == 2 and len(ref) <= n else "length")
    stats = hf_cb.get_engine(model).scheduler
    if engine.startswith("tight"):
        assert stats.num_preemptions > 0, "the tight pool should have forced preemption"
    assert hf_cb.get_engine(model).manager.num_free_pages == hf_cb.get_engine(model).manager.num_pages


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2"])
def test_enabled_generate_equals_per_prompt_generate(name):
    model, refs = model_and_refs(name)
    prompts, max_new = PROMPTS[:12], 16
    per_prompt = [reference_generate(model, p, max_new_tokens=max_new, do_sample=False) for p in prompts]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    stock = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False)
    hf_cb.enable(model)
    try:
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False)
        as_dict = model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, return_dict_in_generate=True
        )
    finally:
        hf_cb.disable(model)
    assert ours.shape == stock.shape
    assert torch.equal(ours[:, :width], ids)
    for row, ref in enumerate(per_prompt):
        new = ours[row, width:].tolist()
        assert new[: len(ref)] == ref
        assert all(t == 0 for t in new[len(ref) :])  # finished rows padded with pad_token_id
    assert torch.equal(as_dict.sequences, ours)


def test_custom_generate_without_enable():
    model, _ = model_and_refs("llama")
    prompt = PROMPTS[3]
    ref = reference_generate(model, prompt, max_new_tokens=10, do_sample=False)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                         custom_generate=hf_cb.generate)
    assert out[0, len(prompt):].tolist() == ref


def test_enable_is_idempotent_and_disable_restores():
    model, _ = model_and_refs("llama")
    stock = model.generate
    assert hf_cb.enable(hf_cb.enable(model)) is model
    assert model.generate is not stock
    hf_cb.disable(model)
    assert model.generate == stock and "generate" not in model.__dict__


def test_unsupported_modes_fall_back_to_stock_generate(caplog):
    model, _ = model_and_refs("llama")
    ids = torch.tensor([PROMPTS[2][:20], PROMPTS[4][:20]])
    mask = torch.ones_like(ids)
    cases = [
        dict(num_beams=3, max_new_tokens=6),
        dict(max_new_tokens=6, no_repeat_ngram_size=2),
        dict(max_new_tokens=6, output_scores=True, return_dict_in_generate=True),
    ]
    stock_out = [model.generate(ids, attention_mask=mask, do_sample=False, **c) for c in cases]
    hf_cb.enable(model)
    try:
        engine_before = getattr(model, "_hf_cb_engine", None)
        for c, expected in zip(cases, stock_out):
            got = model.generate(ids, attention_mask=mask, do_sample=False, **c)
            got = got.sequences if hasattr(got, "sequences") else got
            expected = expected.sequences if hasattr(expected, "sequences") else expected
            assert torch.equal(got, expected)
        assert getattr(model, "_hf_cb_engine", None) is engine_before  # never touched the engine
        # Each reason is said once, naming what sent the call to stock generate.
        model.generate(ids, attention_mask=mask, do_sample=False, **cases[0])
        said = [r.getMessage() for r in caplog.records if "runs stock Transformers generate" in r.getMessage()]
        assert len(said) == len(cases)
        assert "num_beams=3" in said[0] and "no_repeat_ngram_size=2" in said[1] and "output_scores" in said[2]
    finally:
        hf_cb.disable(model)


def test_inputs_as_tensor_batchencoding_and_num_return_sequences():
    model, refs = model_and_refs("qwen2")
    prompts = PROMPTS[2:6]
    width = max(map(len, prompts))
    right = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    expected = [reference_generate(model, p, max_new_tokens=5, do_sample=False) for p in prompts]
    outs = model.generate_batch_continuous(right, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert [o.token_ids for o in outs] == expected
    # Sampling with top_k=1 is greedy: each of the n samples equals the greedy output.
    outs = model.generate_batch_continuous(
        {"input_ids": right, "attention_mask": mask}, max_new_tokens=5, do_sample=True, top_k=1,
        num_return_sequences=2,
    )
    assert [o.token_ids for o in outs] == [e for e in expected for _ in range(2)]
    assert [o.prompt_ids for o in outs[::2]] == prompts


def test_progress_bar_on_long_batches_off_in_generate(capsys):
    model, _ = model_and_refs("llama")
    model.generate_batch_continuous(PROMPTS[:4], max_new_tokens=3, progress=True)
    err = capsys.readouterr().err
    assert "hf_cb" in err and "4/4" in err and "tok_s" in err
    model.generate_batch_continuous(PROMPTS[:4], max_new_tokens=3)  # short batch: no bar by default
    hf_cb.enable(model)
    try:
        ids = torch.tensor([PROMPTS[2][:10]])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3)
    finally:
        hf_cb.disable(model)
    assert "hf_cb" not in capsys.readouterr().err


def test_compiled_forward_equals_generate():
    model, refs = model_and_refs("llama")
    outs = model.generate_batch_continuous(
        PROMPTS[:8], max_new_tokens=MAX_NEW[:8], do_sample=False, engine_config=hf_cb.EngineConfig(compile=True)
    )
    assert [o.token_ids for o in outs] == refs[:8]
