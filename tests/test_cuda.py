"""GPU tests: FlashInfer kernels and the engine in bf16/fp16 (skipped without CUDA and FlashInfer).

In half precision the kernels round differently from Transformers' SDPA, so greedy outputs are
checked teacher-forced: every chosen token's logit under the plain HF forward over the produced
sequence must be within `LOGIT_TOL` of that position's maximum.
"""

import importlib.util

import pytest
import torch
from attention_cases import run_case
from conftest import model_from_config, random_prompts
from transformers import LlamaConfig, Qwen3Config

import hf_cb
from hf_cb.attention.backends.flashinfer_backend import FlashInferBackend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("flashinfer") is None,
        reason="needs a CUDA GPU and FlashInfer",
    ),
]

PS = 16
# Row lengths straddle page boundaries (PS - 1, PS, PS + 1, multiples).
STEPS = {
    "prefill": ([PS - 1, PS, PS + 1, 3 * PS, 100], [PS - 1, PS, PS + 1, 3 * PS, 100]),
    "decode": ([1] * 6, [1, PS - 1, PS, PS + 1, 2 * PS, 300]),
    "mixed": ([1, 37, 1, PS, 5], [PS, 37, 2 * PS + 1, 4 * PS, 70]),
    # The scheduler's order: decode rows first, run by the decode kernel, then prefill rows.
    "decode-first": ([1, 1, 1, 37, PS + 1], [PS, 2 * PS + 1, 300, 37, 4 * PS]),
}
# Relative error of one attention step against float64 (bf16 has an 8-bit mantissa).
ATTN_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
# Teacher-forced tolerance: chosen logit >= max logit - LOGIT_TOL * (max - min) of that row.
LOGIT_TOL = 0.02


def flashinfer_backend(head_dim, heads, dtype, kv_layout="NHD"):
    return FlashInferBackend(
        num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim, page_size=PS, dtype=dtype,
        device=torch.device("cuda"), max_num_seqs=8, max_num_tokens=4096, max_num_page_ids=4096,
        kv_layout=kv_layout,
    )


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_flashinfer_step_matches_float64_reference(step, heads, head_dim, dtype, kv_layout):
    q_lens, kv_lens = STEPS[step]
    err = run_case(
        flashinfer_backend(head_dim, heads, dtype, kv_layout), q_lens, kv_lens, num_heads=heads[0],
        num_kv_heads=heads[1], head_dim=head_dim, page_size=PS, dtype=dtype, device="cuda",
    )
    assert err < ATTN_TOL[dtype]


def tiny_gpu_model(kind: str, dtype):
    common = dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if kind == "llama":  # head_dim 64
        config = LlamaConfig(**common)
    else:  # qwen3, head_dim 128
        config = Qwen3Config(**common, head_dim=128)
    return model_from_config(config, seed=7, dtype=dtype, device="cuda")


def teacher_forced_gaps(model, prompt, tokens):
    """For each produced token: (max logit - chosen logit) / (max - min), under the plain forward."""
    full = torch.tensor([prompt + tokens], device="cuda")
    with torch.no_grad():
        logits = model(full).logits[0, len(prompt) - 1 : -1].float()
    chosen = logits.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
    top, bottom = logits.max(-1).values, logits.min(-1).values
    return ((top - chosen) / (top - bottom)).tolist()


PROMPTS = random_prompts(56, 1, 400, seed=11, vocab=1024)
MAX_NEW = [(i * 7) % 48 + 1 for i in range(len(PROMPTS))]
ENGINES = {
    "default": hf_cb.EngineConfig(),
    "preempt-chunked": hf_cb.EngineConfig(page_size=16, num_pages=64, max_num_seqs=12, max_num_batched_tokens=96),
    "nhd": hf_cb.EngineConfig(kv_layout="NHD"),  # pages [tokens, heads, dim] (the default is HND)
    "split-kv": hf_cb.EngineConfig(decode_split_kv=True),  # every decode graph may split the KV
}


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_greedy_outputs_are_teacher_forced_argmax(kind, dtype, engine):
    model = tiny_gpu_model(kind, dtype)
    outs = model.generate_batch_continuous(
        PROMPTS, max_new_tokens=MAX_NEW, do_sample=False, engine_config=ENGINES[engine]
    )
    eng = hf_cb.get_engine(model)
    assert type(eng.backend).__name__ == "FlashInferBackend"
    if engine == "preempt-chunked":
        assert eng.scheduler.num_preemptions > 0
    assert_teacher_forced(model, PROMPTS, outs, MAX_NEW, f"{kind} {dtype} {engine}")
    assert eng.manager.num_free_pages == eng.manager.num_pages


def assert_teacher_forced(model, prompts, outs, max_new, label: str) -> None:
    """Every output has 1 to its ``max_new`` tokens, each within `LOGIT_TOL` of its position's
    maximum under the plain forward."""
    worst = 0.0
    for prompt, out, n in zip(prompts, outs, max_new):
        assert 1 <= len(out.token_ids) <= n
        worst = max(worst, *teacher_forced_gaps(model, prompt, out.token_ids))
    print(f"{label}: worst teacher-forced gap {worst:.4f}")
    assert worst <= LOGIT_TOL


def test_teacher_forced_check_catches_wrong_tokens():
    model = tiny_gpu_model("llama", torch.bfloat16)
    prompt = PROMPTS[5]
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device="cuda")).logits[0, -1]
    wrong = [int(logits.argsort()[len(logits) // 2])]  # a median token, not the argmax
    assert max(teacher_forced_gaps(model, prompt, wrong)) > LOGIT_TOL


def test_cuda_pool_is_sized_from_free_memory():
    model = tiny_gpu_model("llama", torch.bfloat16)
    engine = hf_cb.get_engine(model)
    free, total = torch.cuda.mem_get_info()
    pool_bytes = engine.manager.num_pages * engine.page_bytes
    assert pool_bytes > 0.5 * total * 0.9 - (total - free)  # most of the card went to pages
    assert free > 0.05 * total  # and headroom stayed free


def test_fp32_on_cuda_falls_back_to_torch_backend_with_a_warning():
    model = tiny_gpu_model("llama", torch.float32)
    with pytest.warns(UserWarning, match="PyTorch attention backend on CUDA: FlashInfer has no torch.float32"):
        engine = hf_cb.get_engine(model, hf_cb.EngineConfig(num_pages=256))
    assert type(engine.backend).__name__ == "TorchAttentionBackend"


@pytest.mark.parametrize("fuse", [False, True], ids=["own-projections", "fused-projections"])
def test_compiled_forward_with_graphs_is_teacher_forced_argmax(fuse):
    model = tiny_gpu_model("llama", torch.bfloat16)
    prompts, max_new = PROMPTS[:24], MAX_NEW[:24]
    config = hf_cb.EngineConfig(compile=True, fuse_projections=fuse)
    outs = model.generate_batch_continuous(prompts, max_new_tokens=max_new, do_sample=False, engine_config=config)
    engine = hf_cb.get_engine(model)
    assert engine.runner.graphs is not None and len(engine.fused) == (2 * model.config.num_hidden_layers if fuse else 0)
    worst = max(max(teacher_forced_gaps(model, p, o.token_ids)) for p, o in zip(prompts, outs))
    print(f"compiled + graphs, fuse_projections={fuse}: worst teacher-forced gap {worst:.4f}")
    assert worst <= LOGIT_TOL


def test_pending_tokens_do_not_recompile_the_compiled_forward():
    """Async scheduling fills the still-pending input tokens of a mixed step on the device. A new
    tensor there (instead of the staged view) changed torch.compile's guards, and the first such
    step of a run recompiled the forward (about 1.3 s on llama-1b)."""
    from torch._dynamo.utils import counters

    model = tiny_gpu_model("llama", torch.bfloat16)
    # A small token budget chunks the prompts, so decode rows share steps with prompt chunks.
    base = dict(compile=True, max_num_batched_tokens=64)
    kwargs = dict(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None)
    # The same schedule without overlap compiles every shape, with no pending tokens.
    model.generate_batch_continuous(PROMPTS, engine_config=hf_cb.EngineConfig(**base, async_scheduling=False), **kwargs)
    compiled = counters["frames"]["ok"]
    model.generate_batch_continuous(PROMPTS, engine_config=hf_cb.EngineConfig(**base), **kwargs)
    engine = hf_cb.get_engine(model)
    assert engine.stats.steps > engine.stats.decode_steps  # mixed steps ran, with pending tokens
    assert counters["frames"]["ok"] == compiled


def test_decode_graphs_share_their_logits_memory():
    """Every decode graph's logits (rows x vocab) are unowned (`cuda_graphs.unowned`), so the
    next capture reuses them: what the buckets keep allocated in the graphs' memory pool does not
    grow with their number (on the H200 0-32 MiB against 134 MiB for every bucket's logits; for
    Llama's vocabulary up to 1024 rows, 8.5 GB). Greedy output through the buckets stays right."""
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32000, max_position_embeddings=512)
    model = model_from_config(config, seed=3, dtype=torch.bfloat16, device="cuda")
    engine = hf_cb.get_engine(model, hf_cb.EngineConfig(max_num_seqs=256, num_pages=128, compile=False))
    graphs = engine.runner.graphs
    torch.cuda.synchronize()
    kept = sum(block["size"] for segment in torch.cuda.memory_snapshot()
               if tuple(segment["segment_pool_id"]) == tuple(graphs.pool)
               for block in segment["blocks"] if block["state"] == "active_allocated")
    row_bytes = config.vocab_size * 2
    print(f"{len(graphs.sizes)} decode graphs keep {kept / 2**20:.1f} MiB of their pool allocated; their "
          f"logits sum to {sum(graphs.sizes) * row_bytes / 2**20:.1f} MiB, the largest {max(graphs.sizes) * row_bytes / 2**20:.1f}")
    assert kept < sum(graphs.sizes) * row_bytes / 3
    prompts = random_prompts(40, 3, 60, seed=5, vocab=32000)
    outs = model.generate_batch_continuous(prompts, max_new_tokens=[(i * 5) % 30 + 2 for i in range(40)],
                                           do_sample=False)  # the batch shrinks through the buckets
    assert engine.stats.decode_steps > 0
    worst = max(max(teacher_forced_gaps(model, p, o.token_ids)) for p, o in zip(prompts, outs))
    assert worst <= LOGIT_TOL
