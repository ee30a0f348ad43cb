"""Does a decode step's attention (bound by memory) overlap with its GEMMs (bound by compute)?

    python benchmarks/stream_overlap.py

W4's decode steps on llama-8b (1024 rows; ``--model llama-1b``: W1's 256) spend about two thirds of their time in projection GEMMs
at the matrix rate and one third in decode attention at the memory bandwidth, one after the other.
An engine that splits the rows into two halves and runs one half's attention while the other
half's GEMMs run (two streams) could approach the larger of the two instead of their sum. This
measures whether the GPU overlaps them: CUDA graphs of ``--layers`` layers of llama-8b's GEMMs
(cuBLAS, q/k/v and gate/up fused) and of FlashInfer's tensor-core decode attention (the engine's
decode graphs, HND, 64-token pages, the workload's context lengths), each replayed alone, and the GEMM graph
of one half replayed on one stream while the attention graph of the other half replays on another.
"""

from __future__ import annotations

import argparse
import random

import torch
from decode_kernels import capture, graph_decode_run
from throughput import median_seconds  # first: puts the repository on sys.path

# name: (hidden, intermediate, heads, KV heads, head dim, the workload's rows, its context lengths)
MODELS = {"llama-8b": (4096, 14336, 32, 8, 128, 1024, (60, 386)),  # W4
          "llama-1b": (2048, 8192, 32, 8, 64, 256, (100, 2048))}  # W1


def gemm_graph(model: str, rows: int, layers: int) -> torch.cuda.CUDAGraph:
    """A graph of ``layers`` layers of the projections' GEMMs over ``rows`` rows (separate weights
    per layer, as a step reads them)."""
    hidden, inter, heads, kv_heads, head_dim = MODELS[model][:5]
    shapes = {"qkv": (head_dim * (heads + 2 * kv_heads), hidden), "o": (hidden, hidden),
              "gate_up": (2 * inter, hidden), "down": (hidden, inter)}
    weights = [{name: torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 0.01 for name, shape in shapes.items()}
               for _ in range(layers)]
    x = torch.randn(rows, hidden, dtype=torch.bfloat16, device="cuda")
    h = torch.randn(rows, inter, dtype=torch.bfloat16, device="cuda")

    def run():
        for w in weights:
            for name, weight in w.items():
                torch.nn.functional.linear(h if name == "down" else x, weight)

    graph = capture([run])[0]
    graph.keep = (weights, x, h)  # the graph reads them
    return graph


def attention_replay(model: str, rows: int, layers: int, seed: int):
    _, _, heads, kv_heads, head_dim, _, (lo, hi) = MODELS[model]
    rng = random.Random(seed)
    kv_lens = [rng.randint(lo, hi) for _ in range(rows)]
    return graph_decode_run(heads, kv_heads, head_dim, kv_lens, 64, layers, "tc-nosplit")[0]


def side_by_side(first, second):
    """Replay ``first`` and ``second`` on two streams at once."""
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def run():
        s1.wait_stream(torch.cuda.current_stream())
        s2.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s1):
            first()
        with torch.cuda.stream(s2):
            second()
        torch.cuda.current_stream().wait_stream(s1)
        torch.cuda.current_stream().wait_stream(s2)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-8b", choices=list(MODELS))
    p.add_argument("--rows", type=int, help="the step's rows, split into two halves (default: the workload's)")
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    m, rows = args.model, args.rows or MODELS[args.model][5]
    half = rows // 2
    ms = {}
    gemm_full, attn_full = gemm_graph(m, rows, args.layers), attention_replay(m, rows, args.layers, 0)
    gemm_half, attn_half = gemm_graph(m, half, args.layers), attention_replay(m, half, args.layers, 1)

    def timed(name, fn):
        ms[name] = median_seconds(fn, warmup=3, reps=20) * 1e3 / args.layers

    timed("gemms, all rows", gemm_full.replay)
    timed("attention, all rows", attn_full)
    timed("gemms, one half", gemm_half.replay)
    timed("attention, one half", attn_half)
    timed("one half's gemms beside the other half's attention", side_by_side(gemm_half.replay, attn_half))
    print(f"{torch.cuda.get_device_name()}, {m} layers, {rows} rows (halves of {half}), ms per layer")
    print("| what | ms/layer |\n|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.4f} |")
    today = ms["gemms, all rows"] + ms["attention, all rows"]
    split = 2 * ms["one half's gemms beside the other half's attention"]
    print(f"| today: gemms then attention, all rows | {today:.4f} |")
    print(f"| two halves overlapped (twice the side-by-side replay) | {split:.4f} |")


if __name__ == "__main__":
    main()
