"""FlashInfer decode attention, per workload: KV layout, kernel and page size, measured.

    FLASHINFER_DISABLE_JIT=1 python benchmarks/decode_kernels.py

For the decode steps of W1, W2 and W4 (and W1 on qwen3-0.6b), one layer's decode attention over
pages in random order, for each KV layout (``NHD``: a page is [tokens, heads, dim]; ``HND``:
[heads, tokens, dim]), kernel (FlashInfer's CUDA-core decode kernel, or its tensor-core path
through the fa2 or fa3 prefill kernels) and page size. Median of CUDA-event-timed runs of
``wrapper.run`` after one ``plan``; "TB/s" counts the K and V read. Variants whose kernels are
not prebuilt fail under ``FLASHINFER_DISABLE_JIT=1`` and are reported as such.
"""

from __future__ import annotations

import argparse
import random

import torch

from throughput import median_seconds  # first: puts the repository on sys.path

# name: (query heads, KV heads, head dim, rows, context lengths drawn from this range)
STEPS = {
    "W1 llama-1b": (32, 8, 64, 256, (100, 2048)),
    "W2 llama-1b": (32, 8, 64, 32, (256, 1280)),
    "W4 llama-8b": (32, 8, 128, 1024, (60, 386)),
    "W1 qwen3-0.6b": (16, 8, 128, 256, (100, 2048)),
}
KERNELS = {"cuda-core": dict(use_tensor_cores=False), "tc-fa2": dict(use_tensor_cores=True, backend="fa2"),
           "tc-fa3": dict(use_tensor_cores=True, backend="fa3")}


def decode_run(heads, kv_heads, head_dim, kv_lens, page_size, layout, kernel):
    import flashinfer

    pages_per_seq = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(pages_per_seq)
    ids = list(range(num_pages))
    random.Random(0).shuffle(ids)  # pages of a long-running engine are scattered
    indptr = torch.tensor([0] + list(torch.tensor(pages_per_seq).cumsum(0)), dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * page_size for n, p in zip(kv_lens, pages_per_seq)], dtype=torch.int32)
    page = (page_size, kv_heads, head_dim) if layout == "NHD" else (kv_heads, page_size, head_dim)
    k = torch.randn(num_pages, *page, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(len(kv_lens), heads, head_dim, dtype=torch.bfloat16, device="cuda")
    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, layout, **KERNELS[kernel])
    wrapper.plan(indptr, torch.tensor(ids, dtype=torch.int32, device="cuda"), last, heads, kv_heads, head_dim,
                 page_size, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    return lambda: wrapper.run(q, (k, v))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--page-sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    args = p.parse_args()
    print(torch.cuda.get_device_name())
    print("| step | page | layout | kernel | ms/layer | TB/s of KV |")
    print("|---|---|---|---|---|---|")
    for name in args.steps:
        heads, kv_heads, head_dim, rows, (lo, hi) = STEPS[name]
        rng = random.Random(0)
        kv_lens = [rng.randint(lo, hi) for _ in range(rows)]
        kv_bytes = sum(kv_lens) * 2 * kv_heads * head_dim * 2
        for page_size in args.page_sizes:
            for layout in ("NHD", "HND"):
                for kernel in KERNELS:
                    try:
                        run = decode_run(heads, kv_heads, head_dim, kv_lens, page_size, layout, kernel)
                        ms = median_seconds(run, warmup=5, reps=50) * 1e3
                    except Exception as e:  # a kernel that is not prebuilt, or not supported
                        print(f"| {name} | {page_size} | {layout} | {kernel} | failed: {str(e).splitlines()[0][:80]} | |")
                        continue
                    print(f"| {name} | {page_size} | {layout} | {kernel} | {ms:.4f} | {kv_bytes / ms / 1e9:.2f} |")


if __name__ == "__main__":
    main()
