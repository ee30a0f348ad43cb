"""FlashInfer decode attention, per workload: KV layout, kernel and page size, measured.

    FLASHINFER_DISABLE_JIT=1 python benchmarks/decode_kernels.py
    FLASHINFER_DISABLE_JIT=1 python benchmarks/decode_kernels.py --graphs

For the decode steps of W1, W2 and W4 (and W1 on qwen3-0.6b), one layer's decode attention over
pages in random order, for each KV layout (``NHD``: a page is [tokens, heads, dim]; ``HND``:
[heads, tokens, dim]), kernel (FlashInfer's CUDA-core decode kernel, or its tensor-core path
through the fa2 or fa3 prefill kernels) and page size. Median of CUDA-event-timed runs of
``wrapper.run`` after one ``plan``; "TB/s" counts the K and V read. Variants whose kernels are
not prebuilt fail under ``FLASHINFER_DISABLE_JIT=1`` and are reported as such. ``--kernels
holistic`` adds FlashInfer's persistent `BatchAttention` (one kernel for a mixed batch, the KV
balanced over the SMs), ``xqa`` TensorRT-LLM's XQA; both are compiled on first use.

``--graphs`` measures what the engine's decode graphs run: wrappers built with
``use_cuda_graph=True``, planned for the capture on dummy rows, then re-planned with the step's
rows and replayed; a graph holds one run per layer over ``--layers`` separate caches (so the
L2 cache does not serve the KV), and the time is per layer. Kernels there are the CUDA-core
decode kernel and the tensor-core one with the planner's split of the KV (``tc``) or without
(``tc-nosplit``, ``disable_split_kv``): in a graph the planner always runs the merge kernel.
(A split of hf_cb's own, each row's pages as pseudo-rows merged by log-sum-exp, was measured with
this script at commit ec10198 and was slower everywhere: ``results/h200_decode_chunks.txt``.)
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
from throughput import median_seconds  # first: puts the repository on sys.path

# name: (query heads, KV heads, head dim, rows, context lengths drawn from this range)
STEPS = {
    "W1 llama-1b": (32, 8, 64, 256, (100, 2048)),
    "W2 llama-1b": (32, 8, 64, 32, (256, 1280)),
    "W4 llama-8b": (32, 8, 128, 1024, (60, 386)),
    "W1 qwen3-0.6b": (16, 8, 128, 256, (100, 2048)),
    # a W2 step as it runs: every row the same length (step 600)
    "W2 llama-1b @600": (32, 8, 64, 32, (856, 856)),
    "16 rows llama-1b": (32, 8, 64, 16, (1024, 4096)),
    "64 rows llama-1b": (32, 8, 64, 64, (256, 2048)),
}
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
GRAPH_KERNELS = {"cuda-core": (False, {}), "tc": (True, {}), "tc-nosplit": (True, {"disable_split_kv": True})}
KERNELS = {"cuda-core": dict(use_tensor_cores=False), "tc-fa2": dict(use_tensor_cores=True, backend="fa2"),
           "tc-fa3": dict(use_tensor_cores=True, backend="fa3"), "xqa": None, "holistic": None}
JIT_KERNELS = ("xqa", "holistic")  # compiled on first use: not in the default list


def scattered_pages(kv_lens: list[int], page_size: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Host int32 ``kv_indptr``, the page ids in random order (as a long-running engine's are)
    and host int32 ``kv_last_page_len`` of sequences of ``kv_lens`` tokens."""
    pages_per_seq = [-(-n // page_size) for n in kv_lens]
    ids = list(range(sum(pages_per_seq)))
    random.Random(0).shuffle(ids)
    indptr = torch.tensor([0] + list(torch.tensor(pages_per_seq).cumsum(0)), dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * page_size for n, p in zip(kv_lens, pages_per_seq)], dtype=torch.int32)
    return indptr, ids, last


def xqa_run(q, k, v, indptr, ids, last, page_size, layout, workspace):
    """TensorRT-LLM's XQA decode kernel as the engine runs it (`hf_cb.xqa_decode`; FlashInfer
    compiles it on first use), over the rows' pages as `scattered_pages` gives them."""
    from hf_cb.attention.backends.xqa_decode import XQADecode

    width = int((indptr[1:] - indptr[:-1]).max())
    xqa = XQADecode(q.device, len(last), width, page_size, layout, workspace)
    xqa.stage(indptr.numpy(), np.asarray(ids, dtype=np.int32), last.numpy())
    out = torch.empty_like(q)
    return lambda: xqa.run(q, k, v, scaling=q.shape[-1] ** -0.5, sliding_window=None, out=out)


def holistic_run(q, k, v, indptr, ids, kv_lens, kv_heads, page_size, layout):
    """FlashInfer's holistic `BatchAttention`: one persistent kernel that balances the rows' KV
    over the SMs (compiled on first use)."""
    import flashinfer

    wrapper = flashinfer.BatchAttention(layout, device="cuda")
    wrapper.plan(torch.arange(len(kv_lens) + 1, dtype=torch.int32), indptr,
                 torch.tensor(ids, dtype=torch.int32, device="cuda"), torch.tensor(kv_lens, dtype=torch.int32),
                 q.shape[1], kv_heads, q.shape[-1], q.shape[-1], page_size, causal=True, q_data_type=q.dtype,
                 kv_data_type=k.dtype)
    out = torch.empty_like(q)
    return lambda: wrapper.run(q, (k, v), out=out)[0]


def decode_run(heads, kv_heads, head_dim, kv_lens, page_size, layout, kernel, kv_dtype=torch.bfloat16):
    import flashinfer

    indptr, ids, last = scattered_pages(kv_lens, page_size)
    num_pages = len(ids)
    page = (page_size, kv_heads, head_dim) if layout == "NHD" else (kv_heads, page_size, head_dim)
    torch.manual_seed(0)  # the same caches and queries for every kernel, to compare their outputs
    k = torch.randn(num_pages, *page, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(len(kv_lens), heads, head_dim, dtype=torch.bfloat16, device="cuda")
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    if kernel == "xqa":
        return xqa_run(q, k, v, indptr, ids, last, page_size, layout, workspace)
    if kernel == "holistic":
        return holistic_run(q, k, v, indptr, ids, kv_lens, kv_heads, page_size, layout)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, layout, **KERNELS[kernel])
    wrapper.plan(indptr, torch.tensor(ids, dtype=torch.int32, device="cuda"), last, heads, kv_heads, head_dim,
                 page_size, q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
    return lambda: wrapper.run(q, (k, v))


def graph_inputs(heads, kv_heads, head_dim, rows, num_pages, page_size, layers, kv_dtype):
    """Each layer's K and V pages (HND) and the step's queries, the same for every kernel (seeded),
    to compare their outputs."""
    torch.manual_seed(0)
    page = (num_pages, kv_heads, page_size, head_dim)
    caches = [tuple(torch.randn(page, dtype=torch.bfloat16, device="cuda").to(kv_dtype) for _ in "kv")
              for _ in range(layers)]
    return caches, torch.randn(rows, heads, head_dim, dtype=torch.bfloat16, device="cuda")


def capture(runs: list) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
    """A CUDA graph of ``runs`` (one a layer), each run once on a side stream first (lazy library
    state must not start inside a capture), and the outputs the graph writes."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for run in runs:
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [run() for run in runs]
    return graph, outs


def graph_decode_run(heads, kv_heads, head_dim, kv_lens, page_size, layers, kernel, kv_dtype=torch.bfloat16):
    """Replay a CUDA graph of one decode per layer, planned as the engine plans its graphs."""
    import flashinfer

    tensor_cores, options = GRAPH_KERNELS[kernel]
    b = len(kv_lens)
    step_indptr, ids, step_last = scattered_pages(kv_lens, page_size)
    num_pages = len(ids) + 1  # the last: the capture's scratch page
    i32 = dict(dtype=torch.int32, device="cuda")
    indptr, indices, last = torch.zeros(b + 1, **i32), torch.zeros(num_pages, **i32), torch.zeros(b, **i32)
    caches, q = graph_inputs(heads, kv_heads, head_dim, b, num_pages, page_size, layers, kv_dtype)
    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "HND", use_cuda_graph=True, use_tensor_cores=tensor_cores,
        paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last)

    def plan(ptr, idx, lst):
        wrapper.plan(ptr, idx, lst, heads, kv_heads, head_dim, page_size, q_data_type=torch.bfloat16,
                     kv_data_type=kv_dtype, **options)

    scratch = num_pages - 1
    plan(torch.arange(b + 1, dtype=torch.int32), torch.full((b,), scratch, **i32), torch.ones(b, dtype=torch.int32))
    graph, out = capture([lambda cache=cache: wrapper.run(q, cache) for cache in caches])
    plan(step_indptr, torch.tensor(ids, **i32), step_last)
    graph.keep = (wrapper, workspace, caches, q, indptr, indices, last)  # what the graph reads
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay, out[0]


def graph_xqa_run(heads, kv_heads, head_dim, kv_lens, page_size, layers, kv_dtype=torch.bfloat16):
    """Replay a CUDA graph of one XQA decode per layer: its page table and lengths are read on the
    device, so there is nothing to plan (the caches and queries are ``graph_decode_run``'s)."""
    step_indptr, ids, step_last = scattered_pages(kv_lens, page_size)
    caches, q = graph_inputs(heads, kv_heads, head_dim, len(kv_lens), len(ids) + 1, page_size, layers, kv_dtype)
    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    runs = [xqa_run(q, k, v, step_indptr, ids, step_last, page_size, "HND", workspace) for k, v in caches]
    graph, out = capture(runs)
    graph.keep = (runs, workspace, caches, q)  # what the graph reads
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay, out[0]


def graph_holistic_run(heads, kv_heads, head_dim, kv_lens, page_size, layers, kv_dtype=torch.bfloat16):
    """Replay a CUDA graph of one holistic `BatchAttention` per layer. Its plan's work lists sit at
    fixed offsets of its workspace and its grid is one CTA pair per SM whatever the rows, so a
    graph captured on dummy rows replays another plan; the page ids are read from the buffer
    handed to the capture's plan."""
    import flashinfer

    b = len(kv_lens)
    step_indptr, ids, _ = scattered_pages(kv_lens, page_size)
    num_pages = len(ids) + 1  # the last: the capture's scratch page
    indices = torch.zeros(num_pages, dtype=torch.int32, device="cuda")
    caches, q = graph_inputs(heads, kv_heads, head_dim, b, num_pages, page_size, layers, kv_dtype)
    wrapper = flashinfer.BatchAttention("HND", device="cuda")
    rows = torch.arange(b + 1, dtype=torch.int32)

    def plan(ptr, lens):
        wrapper.plan(rows, ptr, indices, lens, heads, kv_heads, head_dim, head_dim, page_size, causal=True,
                     q_data_type=torch.bfloat16, kv_data_type=kv_dtype)

    indices.fill_(num_pages - 1)
    plan(rows.clone(), torch.ones(b, dtype=torch.int32))
    outs = [torch.empty_like(q) for _ in caches]
    graph, out = capture([lambda cache=cache, o=o: wrapper.run(q, cache, out=o)[0] for cache, o in zip(caches, outs)])
    indices[: len(ids)].copy_(torch.tensor(ids, dtype=torch.int32))
    plan(step_indptr, torch.tensor(kv_lens, dtype=torch.int32))
    graph.keep = (wrapper, caches, q, indices)  # what the graph reads
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay, out[0]


def step_lengths(name: str, kv_bytes_per_element: int = 2) -> tuple[int, int, int, list[int], int]:
    """A named step's (query heads, KV heads, head dim, context lengths, bytes of K and V)."""
    heads, kv_heads, head_dim, rows, (lo, hi) = STEPS[name]
    rng = random.Random(0)
    kv_lens = [rng.randint(lo, hi) for _ in range(rows)]
    return heads, kv_heads, head_dim, kv_lens, sum(kv_lens) * 2 * kv_heads * head_dim * kv_bytes_per_element


def graphs_main(args) -> None:
    kv_dtype = KV_DTYPES[args.kv_dtype]
    print(f"{torch.cuda.get_device_name()}, HND, CUDA-graph replay, {args.layers} layers a graph, {args.kv_dtype} KV")
    print("| step | page | kernel | ms/layer | TB/s of KV | max abs diff vs first kernel |")
    print("|---|---|---|---|---|---|")
    for name in args.steps:
        heads, kv_heads, head_dim, kv_lens, kv_bytes = step_lengths(name, kv_dtype.itemsize)
        for page_size in args.page_sizes:
            reference = None
            for kernel in args.graph_kernels:
                try:
                    if kernel == "xqa":
                        replay, out = graph_xqa_run(heads, kv_heads, head_dim, kv_lens, page_size, args.layers, kv_dtype)
                    elif kernel == "holistic":
                        replay, out = graph_holistic_run(heads, kv_heads, head_dim, kv_lens, page_size, args.layers,
                                                         kv_dtype)
                    else:
                        replay, out = graph_decode_run(heads, kv_heads, head_dim, kv_lens, page_size, args.layers, kernel,
                                                       kv_dtype)
                    ms = median_seconds(replay, warmup=5, reps=50) * 1e3 / args.layers
                except Exception as e:
                    print(f"| {name} | {page_size} | {kernel} | failed: {str(e).splitlines()[0][:80]} | | |")
                    continue
                reference = out.clone() if reference is None else reference
                diff = (out.float() - reference.float()).abs().max().item()
                print(f"| {name} | {page_size} | {kernel} | {ms:.4f} | {kv_bytes / ms / 1e9:.2f} | {diff:.2e} |")
                del replay, out
                torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--page-sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    p.add_argument("--kernels", nargs="+", default=[k for k in KERNELS if k not in JIT_KERNELS],
                   choices=list(KERNELS), help="without --graphs: kernels to time (xqa and holistic are JIT-compiled "
                   "on first use)")
    p.add_argument("--layouts", nargs="+", default=["NHD", "HND"], choices=["NHD", "HND"])
    p.add_argument("--kv-dtype", default="bf16", choices=list(KV_DTYPES),
                   help="the pages' dtype (fp8: e4m3, scale 1; its kernels are JIT-compiled)")
    p.add_argument("--graphs", action="store_true", help="replay engine-style decode graphs (HND)")
    p.add_argument("--graph-kernels", nargs="+", default=list(GRAPH_KERNELS), choices=[*GRAPH_KERNELS, *JIT_KERNELS])
    p.add_argument("--layers", type=int, default=4, help="with --graphs: layers (caches) per graph")
    args = p.parse_args()
    if args.graphs:
        return graphs_main(args)
    kv_dtype = KV_DTYPES[args.kv_dtype]
    print(torch.cuda.get_device_name(), f"{args.kv_dtype} KV")
    print("| step | page | layout | kernel | ms/layer | TB/s of KV | max abs diff vs the first kernel (fp8: vs bf16) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.steps:
        heads, kv_heads, head_dim, kv_lens, kv_bytes = step_lengths(name, kv_dtype.itemsize)
        for page_size in args.page_sizes:
            for layout in args.layouts:
                reference = None  # the first kernel's output; with fp8 pages, bf16 tc-fa2's on the same data
                if kv_dtype != torch.bfloat16:
                    reference = decode_run(heads, kv_heads, head_dim, kv_lens, page_size, layout, "tc-fa2")().float()
                for kernel in args.kernels:
                    try:
                        run = decode_run(heads, kv_heads, head_dim, kv_lens, page_size, layout, kernel, kv_dtype)
                        out = run().float()
                        ms = median_seconds(run, warmup=5, reps=50) * 1e3
                    except Exception as e:  # a kernel that is not prebuilt, or not supported
                        print(f"| {name} | {page_size} | {layout} | {kernel} | failed: {str(e).splitlines()[0][:80]} | | |")
                        continue
                    reference = out if reference is None else reference
                    diff = (out - reference).abs().max().item()
                    print(f"| {name} | {page_size} | {layout} | {kernel} | {ms:.4f} | {kv_bytes / ms / 1e9:.2f} | {diff:.2e} |")


if __name__ == "__main__":
    main()
