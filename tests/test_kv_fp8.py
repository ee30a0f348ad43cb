"""fp8 KV pages (``EngineConfig(kv_cache_dtype="fp8")``) on CPU, float32: greedy output equals
Transformers' `generate` with every key and value rounded to fp8 as the pages store them
(`fp8_reference`), token for token; the pool holds twice the pages; XQA's page table (CUDA) and
its limits, checked on the host."""

import numpy as np
import pytest
import torch
from conftest import random_prompts, reference_generate, tiny_model
from fp8_reference import fp8_kv_forward

import hf_cb
from hf_cb.attention.backends.xqa_decode import dense_page_table, unsupported_reason
from hf_cb.paged_cache import FP8, FP8_MAX, to_cache_dtype

PROMPTS = random_prompts(6, 1, 60, seed=5)
MAX_NEW = 10


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2"])  # gemma2: soft-cap and sliding windows
def test_fp8_pages_greedy_equals_generate_with_fp8_kv(name):
    model = tiny_model(name)
    with fp8_kv_forward(model):
        refs = [reference_generate(model, p, max_new_tokens=MAX_NEW, do_sample=False) for p in PROMPTS]
    config = hf_cb.EngineConfig(kv_cache_dtype="fp8", page_size=8, max_num_batched_tokens=48)
    outs = model.generate_batch_continuous(PROMPTS, max_new_tokens=MAX_NEW, do_sample=False, engine_config=config)
    assert [o.token_ids for o in outs] == refs
    engine = hf_cb.get_engine(model)
    assert engine.cache.layers[0].keys.dtype == FP8
    assert engine.manager.num_free_pages == engine.manager.num_pages


def test_fp8_kv_reference_differs_from_the_plain_forward():
    """The oracle is not the plain forward in disguise: its logits move by the rounding."""
    model = tiny_model("llama")
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        plain = model(ids).logits
        with fp8_kv_forward(model):
            rounded = model(ids).logits
    assert (plain - rounded).abs().max() > 1e-4


def test_fp8_pages_hold_twice_the_tokens():
    model = tiny_model("llama")
    auto = hf_cb.get_engine(model, hf_cb.EngineConfig(cpu_kv_cache_bytes=1 << 20)).num_pages
    hf_cb.release(model)
    fp8 = hf_cb.get_engine(model, hf_cb.EngineConfig(cpu_kv_cache_bytes=1 << 20, kv_cache_dtype="fp8")).num_pages
    assert fp8 == 4 * auto  # float32 model: 4 bytes a value against 1


def test_to_cache_dtype_saturates():
    x = torch.tensor([1000.0, -1000.0, 0.3, float("inf")])
    y = to_cache_dtype(x, FP8).float()
    assert y.tolist()[:2] == [FP8_MAX, -FP8_MAX] and not y.isnan().any()
    assert abs(y[2].item() - 0.3) < 0.02
    assert to_cache_dtype(x, torch.float32) is x


def test_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype 'int4'"):
        hf_cb.EngineConfig(kv_cache_dtype="int4")


def test_dense_page_table_matches_the_csr_rows():
    page_size, width = 4, 5
    pages = [[7, 3], [1], [9, 2, 5, 4], [6]]
    lengths = [6, 1, 16, 4]
    indptr = np.cumsum([0] + [len(p) for p in pages]).astype(np.int32)
    indices = np.array([p for row in pages for p in row], np.int32)
    last = np.array([n - (len(p) - 1) * page_size for n, p in zip(lengths, pages)], np.int32)
    table, got = dense_page_table(indptr, indices, last, page_size, width)
    assert table.shape == (4, width) and table.dtype == np.int32
    for row, p in enumerate(pages):
        assert table[row, : len(p)].tolist() == p
        assert set(table[row, len(p):].tolist()) <= {p[-1]}  # padding: a page of the row's own
    assert got.tolist() == lengths


@pytest.mark.parametrize("args, reason", [
    ((128, 64, None, (9, 0)), None),
    ((64, 16, None, (10, 0)), None),
    ((128, 64, None, (8, 0)), "sm90, sm100 or sm120"),
    ((128, 8, None, (9, 0)), "page_size in"),
    ((96 + 8, 64, None, (9, 0)), "multiple of 16"),
    ((128, 64, 50.0, (9, 0)), "soft-capping"),
])
def test_xqa_limits_are_named(args, reason):
    got = unsupported_reason(*args)
    assert got is None if reason is None else reason in got
