"""A decode step's small kernels as the engine's graphs run them: the projections' GEMMs and the
greedy argmax, per batch size, measured by CUDA-graph replay.

    python benchmarks/decode_gemms.py

GEMMs: llama-1b's projections (q/k/v and gate/up fused, as ``fuse_projections`` runs them) and
its tied LM head at decode batch sizes, through ``F.linear`` (cuBLAS), through cuBLASLt
(``torch.backends.cuda.preferred_blas_library``), and through a Triton kernel for skinny
GEMMs (one program per block of output features, the whole K loop in it, autotuned). A graph
holds one GEMM per copy of the weight, over enough copies that L2 does not hold them; "TB/s"
counts the weight bytes. Argmax: ``logits.argmax(-1)`` against a two-pass argmax
(``view(B, S, V/S).max(-1)``, then the argmax of the S maxima), which spreads a few long rows
over many blocks.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from decode_kernels import capture
from throughput import median_seconds  # first: puts the repository on sys.path

from hf_cb.sampling.sampler import two_pass_argmax

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
          "lm_head": (128256, 2048)}


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
             for n in (16, 32, 64) for k in (128, 256) for w in (4,) for s in (3, 4, 6)],
    key=["M", "N", "K"],
)
@triton.jit
def _skinny_mm(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m[:, None] < M, other=0.0)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :])
        acc += tl.dot(x, tl.trans(w))
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m[:, None] < M)


def skinny_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    y = x.new_empty((M, N))
    _skinny_mm[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](x, w, y, M, N, K, BLOCK_M=max(16, triton.next_power_of_2(M)))
    return y


def graph_time(fn, reps: int) -> float:
    """Seconds per call of ``fn`` (called ``reps`` times in one graph)."""
    graph, _ = capture([fn] * reps)
    return median_seconds(graph.replay, warmup=3, reps=20) / reps


def gemms(batch_sizes: list[int]) -> None:
    print("| GEMM | rows | cuBLAS us | TB/s | cuBLASLt us | TB/s | Triton us | TB/s | Triton max rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        copies = max(2, (400 << 20) // (n * k * 2))
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5 for _ in range(copies)]
        for b in batch_sizes:
            x = torch.randn(b, k, dtype=torch.bfloat16, device="cuda")
            row = []
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                row.append(graph_time(lambda: [F.linear(x, w) for w in ws], 1) / copies)
            torch.backends.cuda.preferred_blas_library("cublas")
            ref = F.linear(x, ws[0]).float()
            err = ((skinny_mm(x, ws[0]).float() - ref).abs().max() / ref.abs().max()).item()
            row.append(graph_time(lambda: [skinny_mm(x, w) for w in ws], 1) / copies)
            cells = " | ".join(f"{t * 1e6:.2f} | {n * k * 2 / t / 1e12:.2f}" for t in row)
            print(f"| {name} ({n}x{k}) | {b} | {cells} | {err:.1e} |", flush=True)
        del ws
        torch.cuda.empty_cache()


def argmaxes(batch_sizes: list[int], vocab: int) -> None:
    parts_choices = [p for p in (64, 128, 256) if vocab % p == 0]
    print(f"\n| argmax over {vocab} | rows | argmax us | " + " | ".join(f"two-pass {p} us" for p in parts_choices) + " |")
    print("|---|---|---|" + "---|" * len(parts_choices))
    for b in batch_sizes:
        logits = torch.randn(b, vocab, dtype=torch.bfloat16, device="cuda")
        logits[:, 7] = logits.max()  # a tie: both must pick the first index
        want = logits.argmax(-1)
        times = [graph_time(lambda: logits.argmax(-1), 10)]
        for p in parts_choices:
            assert torch.equal(two_pass_argmax(logits, p), want), p
            times.append(graph_time(lambda p=p: two_pass_argmax(logits, p), 10))
        print(f"| | {b} | " + " | ".join(f"{t * 1e6:.2f}" for t in times) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64], help="GEMM batch sizes")
    p.add_argument("--argmax-rows", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--vocab", type=int, default=128256)
    args = p.parse_args()
    print(torch.cuda.get_device_name())
    argmaxes(args.argmax_rows, args.vocab)
    print()
    gemms(args.rows)


if __name__ == "__main__":
    main()
