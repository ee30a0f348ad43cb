"""GPU tests of fp8 KV pages (``kv_cache_dtype="fp8"``): FlashInfer's fa2 prefill over fp8
pages, XQA's decode (eager and from CUDA graphs), the compiled forward. The oracle is
Transformers' forward with fp8-rounded keys and values (`fp8_reference`), teacher-forced: XQA's
Hopper kernel also computes q.k and the weighted sum of values in fp8, so the tolerance is
looser than bf16's."""

import pytest
import torch
from conftest import model_from_config, random_prompts
from fp8_reference import fp8_kv_forward
from test_cuda import pytestmark, teacher_forced_gaps  # noqa: F401  (pytestmark: cuda, skipped without a GPU)
from transformers import LlamaConfig, Qwen3Config

import hf_cb

FP8_LOGIT_TOL = 0.06
PROMPTS = random_prompts(40, 1, 400, seed=12, vocab=1024)
MAX_NEW = [(i * 7) % 48 + 1 for i in range(len(PROMPTS))]


def gqa_model(kind: str):
    """bf16, the GQA groups of the benchmark models: llama 4 query heads a KV head of 64, qwen3 2 of 128."""
    common = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 3, "num_key_value_heads": 2,
              "vocab_size": 1024, "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 0}
    if kind == "llama":
        config = LlamaConfig(**common, num_attention_heads=8)
    else:
        config = Qwen3Config(**common, num_attention_heads=4, head_dim=128)
    return model_from_config(config, seed=7, dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs-compiled", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_fp8_pages_are_teacher_forced_argmax(kind, graphs):
    model = gqa_model(kind)
    config = hf_cb.EngineConfig(kv_cache_dtype="fp8", cuda_graphs=graphs)
    outs = model.generate_batch_continuous(PROMPTS, max_new_tokens=MAX_NEW, do_sample=False, engine_config=config)
    engine = hf_cb.get_engine(model)
    assert engine.cache.layers[0].keys.dtype == torch.float8_e4m3fn
    assert engine.backend.xqa is not None and (engine.runner.graphs is not None) == graphs
    assert engine.manager.num_free_pages == engine.manager.num_pages
    with fp8_kv_forward(model):
        worst = max(max(teacher_forced_gaps(model, p, o.token_ids)) for p, o in zip(PROMPTS, outs))
    print(f"fp8 pages, {kind}, graphs={graphs}: worst teacher-forced gap {worst:.4f}")
    assert worst <= FP8_LOGIT_TOL


def test_fp8_pages_with_fa3_prefill_are_refused():
    model = gqa_model("llama")
    with pytest.raises(ValueError, match="fa3 kernels do not read fp8 pages"):
        hf_cb.get_engine(model, hf_cb.EngineConfig(kv_cache_dtype="fp8", prefill_backend="fa3"))
