"""hf_cb alone on one workload over a grid of `EngineConfig` values, one model object, one run:
how the defaults (chunk budget, ``max_num_seqs``, page size, compile) were chosen.

    python benchmarks/sweep.py --model llama-1b --workload W3 \
        --grid max_num_batched_tokens=8192,16384 max_num_seqs=256,512

Each point is measured like `throughput.py` measures hf_cb (an unmeasured warm-up run, then the
whole workload) and printed as a table row with the engine's step counts and host time.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import time
from pathlib import Path

from throughput import (  # first: puts the repository on sys.path
    ALIASES,
    WORKLOADS,
    Workload,
    build_model,
    make_workload,
    measure,
    measure_bandwidth,
    measure_matrix_rate,
    roofline_tokens_per_s,
    run_hf_cb,
)

# isort: split
import torch
from config_args import parse_config, parse_grid

import hf_cb
from hf_cb.core.stats import StepStats


def _run_fresh_stats(model, wl: Workload, config: hf_cb.EngineConfig, last: dict) -> list[list[int]]:
    """`run_hf_cb`, with the engine's step counters covering this run only; ``last`` gets the
    number of frames torch.compile compiled during the run (recompiles) and the time spent in
    garbage collection."""
    from torch._dynamo.utils import counters

    hf_cb.get_engine(model, config).stats = StepStats()
    frames_before = counters["frames"]["ok"]
    pauses, started = [], []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        else:
            pauses.append(time.perf_counter() - started.pop())

    gc.callbacks.append(on_gc)
    try:
        outs = run_hf_cb(model, wl, config, progress=False)
    finally:
        gc.callbacks.remove(on_gc)
    last["compiled_frames"] = counters["frames"]["ok"] - frames_before
    last["gc_pause_s"] = sum(pauses)
    return outs


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--workload", default="W3")
    p.add_argument("--grid", nargs="*", default=[], help="EngineConfig field=value,value,...")
    p.add_argument("--base", nargs="*", default=[], help="EngineConfig field=value held fixed")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    workload = ALIASES.get(args.workload, args.workload)
    if workload not in WORKLOADS:
        p.error(f"unknown workload {args.workload!r}")
    grid, base = parse_grid(args.grid), parse_config(args.base)

    model = build_model(args.model, torch.bfloat16, "cuda")
    wl = make_workload(workload, model.config.vocab_size, args.limit)
    warm = wl.head(8, max_output=16)
    roofline = roofline_tokens_per_s(model, wl, measure_bandwidth("cuda"), measure_matrix_rate("cuda", torch.bfloat16))
    print(f"{args.model} {workload}: roofline {roofline:,.0f} output tok/s, {torch.cuda.get_device_name()}")
    print("| config | output tok/s | fraction of roofline | steps | decode steps | host ms/step | wait ms/step "
          "| frames compiled in the run | GC pauses (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for values in itertools.product(*grid.values()):
        point = {**base, **dict(zip(grid, values))}
        config = hf_cb.EngineConfig(**point)
        last = {}
        r = measure("hf_cb", lambda w: _run_fresh_stats(model, w, config, last), wl, warm)
        stats = {**hf_cb.get_engine(model).stats.summary(), **last}
        hf_cb.release(model)
        torch.cuda.empty_cache()
        label = " ".join(f"{k}={v}" for k, v in point.items()) or "defaults"
        print(f"| {label} | {r.output_tok_s:,.0f} | {r.output_tok_s / roofline:.3f} | {stats['steps']} | "
              f"{stats['decode_steps']} | {stats['host_ms_per_step']:.2f} | {stats['wait_ms_per_step']:.2f} | "
              f"{stats['compiled_frames']} | {stats['gc_pause_s']:.2f} |",
              flush=True)
        rows.append({"config": point, "output_tok_s": r.output_tok_s, "roofline": roofline, "stats": stats})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
