"""GPU tests of models with recurrent state (hybrid linear attention, state-space) in bf16/fp16:
greedy outputs teacher-forced against the plain forward (see test_cuda.py), under the default
engine and under preemption with chunked prefill. Skipped without CUDA."""

import pytest
import torch
from conftest import model_from_config, random_prompts
from test_cuda import assert_teacher_forced
from transformers import AutoConfig

import hf_cb

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

COMMON = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              vocab_size=1024, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SHAPES = {
    # Qwen3.5's pattern: three Gated DeltaNet layers to one attention layer.
    "qwen3_5_text": dict(num_hidden_layers=4, linear_num_key_heads=4, linear_num_value_heads=8,
                         linear_key_head_dim=32, linear_value_head_dim=32),
    "qwen3_next": dict(num_hidden_layers=4, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32,
                       linear_value_head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                       shared_expert_intermediate_size=128),
    "mamba2": dict(num_hidden_layers=3, num_heads=8, head_dim=64, state_size=64, n_groups=1, expand=2),
    "falcon_h1": dict(num_hidden_layers=2, mamba_d_ssm=512, mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64),
}
PROMPTS = random_prompts(24, 1, 300, seed=13, vocab=1024)
MAX_NEW = [(i * 7) % 40 + 1 for i in range(len(PROMPTS))]
ENGINES = {
    "default": hf_cb.EngineConfig(),
    "preempt-chunked": hf_cb.EngineConfig(page_size=16, num_pages=48, max_num_seqs=8, max_num_batched_tokens=96),
}


def gpu_model(model_type: str, dtype):
    config = AutoConfig.for_model(model_type, **{**COMMON, **SHAPES[model_type]})
    return model_from_config(config, seed=7, dtype=dtype, device="cuda")


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("model_type", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_greedy_outputs_are_teacher_forced_argmax(model_type, dtype, engine):
    model = gpu_model(model_type, dtype)
    outs = model.generate_batch_continuous(PROMPTS, max_new_tokens=MAX_NEW, do_sample=False,
                                           engine_config=ENGINES[engine], progress=False)
    eng = hf_cb.get_engine(model)
    assert eng.shape.stateful
    if engine == "preempt-chunked":
        assert eng.scheduler.num_preemptions > 0
    assert_teacher_forced(model, PROMPTS, outs, MAX_NEW, f"{model_type} {dtype} {engine}")
    assert eng.manager.num_free_pages == eng.manager.num_pages
    assert eng.manager.num_free_rows == eng.config.max_num_seqs
