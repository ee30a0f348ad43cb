"""FlashInfer kernel choices, measured: decode with and without tensor cores, prefill fa2 vs fa3.

    python benchmarks/attention_kernels.py

Shapes are those of the benchmark models (llama-1b: 32/8 heads of 64; qwen3-0.6b: 16/8 of 128)
at a W1-like steady state (256 sequences, contexts uniform in 100..2048), a W3-like prefill
chunk (8 prompts of 1024 tokens) and a W3-like mixed step (248 decode rows and 8 prompts). Times are medians of CUDA-event-timed runs of one layer.
"""

from __future__ import annotations

import random

import torch
from throughput import median_seconds  # first: puts the repository on sys.path

from hf_cb.attention.backends.flashinfer_backend import FlashInferBackend
from hf_cb.manager import PageManager

PS = 16
SHAPES = {"llama-1b": (32, 8, 64), "qwen3-0.6b": (16, 8, 128)}


def setup(q_lens, kv_lens, heads, kv_heads, head_dim, **backend_kwargs):
    num_pages = sum(-(-n // PS) for n in kv_lens) + 1
    manager = PageManager(num_pages, PS, len(kv_lens), max(-(-n // PS) for n in kv_lens))
    random.Random(0).shuffle(manager._free_pages)
    for s, n in enumerate(kv_lens):
        manager.allocate(s, n)
    table = manager.build(list(range(len(kv_lens))), [k - q for k, q in zip(kv_lens, q_lens)], q_lens)
    backend = FlashInferBackend(
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, page_size=PS, dtype=torch.bfloat16,
        device=torch.device("cuda"), max_num_seqs=len(kv_lens), max_num_tokens=sum(q_lens),
        max_num_page_ids=num_pages, **backend_kwargs,
    )
    page = (PS, kv_heads) if backend.kv_layout == "NHD" else (kv_heads, PS)
    shape = (num_pages + 1, *page, head_dim)
    k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(sum(q_lens), heads, head_dim, dtype=torch.bfloat16, device="cuda")
    step = backend.plan(table)
    return lambda: step.attend(q, k, v, scaling=head_dim**-0.5, sliding_window=None, softcap=None)


def main() -> None:
    rng = random.Random(0)
    print(f"{torch.cuda.get_device_name()}")
    print("| kernel | model | setting | ms/layer | achieved |")
    print("|---|---|---|---|---|")
    for name, (heads, kv_heads, head_dim) in SHAPES.items():
        kv_lens = [rng.randint(100, 2048) for _ in range(256)]
        kv_bytes = sum(kv_lens) * 2 * kv_heads * head_dim * 2
        for tensor_cores in (False, True):
            run = setup([1] * 256, kv_lens, heads, kv_heads, head_dim, decode_tensor_cores=tensor_cores)
            ms = median_seconds(run, warmup=5, reps=50) * 1e3
            print(f"| decode | {name} | tensor cores {tensor_cores} | {ms:.3f} | {kv_bytes / ms / 1e9:.2f} TB/s of KV |")
        q_lens = [1024] * 8
        flops = sum(2 * 2 * heads * head_dim * q * (q + 1) / 2 for q in q_lens)
        for prefill_backend in ("fa2", "fa3"):
            run = setup(q_lens, q_lens, heads, kv_heads, head_dim, prefill_backend=prefill_backend)
            ms = median_seconds(run, warmup=5, reps=50) * 1e3
            print(f"| prefill | {name} | {prefill_backend} | {ms:.3f} | {flops / ms / 1e9:.0f} TFLOP/s |")
        # A W3 mixed step: 248 decode rows beside 8 prompt chunks of 1024 tokens. Prefill rows
        # first keeps every row on the prefill kernel; decode rows first splits the step.
        decode_kv = [rng.randint(1024, 1152) for _ in range(248)]
        for order in ("prefill rows first", "decode rows first"):
            q_lens, kv_lens = [1] * 248 + [1024] * 8, decode_kv + [1024] * 8
            if order == "prefill rows first":
                q_lens, kv_lens = q_lens[::-1], kv_lens[::-1]
            run = setup(q_lens, kv_lens, heads, kv_heads, head_dim)
            ms = median_seconds(run, warmup=5, reps=50) * 1e3
            print(f"| mixed | {name} | {order} | {ms:.3f} | |")


if __name__ == "__main__":
    main()
