"""Where a step's time goes: torch profiler over steady-state steps of a benchmark workload.

    python benchmarks/profile_step.py --model llama-1b --workload mixed --steps 40 --trace /tmp/trace.json

``--engines 2`` profiles the same window in a second engine built after the first in one process
(with ``--compile`` the first engine of a process ran slower; this shows where).

Prints wall time per step, device (kernel) time per step, the host-side split recorded by the
engine (scheduling/preparing/launching vs blocked on the device), and the top kernels.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from contextlib import nullcontext

from throughput import ALIASES, build_model, make_workload  # first: puts the repository on sys.path

# isort: split
import torch
from config_args import parse_config
from torch.profiler import ProfilerActivity, profile, schedule

import hf_cb
from hf_cb.sampling.params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--workload", default="mixed")
    p.add_argument("--skip-steps", type=int, default=300, help="steps before the profiled window")
    p.add_argument("--steps", type=int, default=40, help="profiled steps")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-async", action="store_true")
    p.add_argument("--trace", default=None, help="write a chrome trace here")
    p.add_argument("--cprofile", action="store_true", help="also print the host's hottest functions in the window")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the forward (default: the engine decides; on with CUDA graphs)")
    p.add_argument("--no-profiler", action="store_true", help="time the window without the torch profiler's overhead")
    p.add_argument("--config", nargs="*", default=[], help="more EngineConfig field=value")
    p.add_argument("--engines", type=int, default=1,
                   help="profile the same window in this many engines built one after another in this process")
    args = p.parse_args()

    model = build_model(args.model, torch.bfloat16, "cuda")
    wl = make_workload(ALIASES.get(args.workload, args.workload), model.config.vocab_size)
    config = hf_cb.EngineConfig(
        cuda_graphs=not args.no_cuda_graphs, async_scheduling=not args.no_async, compile=args.compile,
        **parse_config(args.config),
    )
    for i in range(args.engines):
        start = time.perf_counter()
        engine = hf_cb.get_engine(model, config)
        print(f"\n== engine {i + 1} of {args.engines}: built in {time.perf_counter() - start:.1f} s")
        profile_window(engine, wl, args)
        hf_cb.release(model)


def profile_window(engine, wl, args) -> None:
    """Run the workload on ``engine`` up to the end of the window; print the window's numbers."""
    host_prof = cProfile.Profile()
    seqs = [engine.add_request(pr, SamplingParams(n), seed=0, index=i) for i, (pr, n) in enumerate(zip(wl.prompts, wl.output_lens))]

    class WindowDone(Exception):
        pass

    marks = {}
    window = schedule(wait=args.skip_steps, warmup=5, active=args.steps, repeat=1)
    profiler = nullcontext(None) if args.no_profiler else profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=window
    )
    with profiler as prof:
        counter = [0]

        def on_step(_updated):
            counter[0] += 1
            if counter[0] == args.skip_steps + 5:
                if args.cprofile:
                    host_prof.enable()
                marks["start"] = (time.perf_counter(), engine.stats.host_s, engine.stats.wait_s, engine.stats.decode_steps)
            if counter[0] == args.skip_steps + 5 + args.steps:
                host_prof.disable()
                marks["end"] = (time.perf_counter(), engine.stats.host_s, engine.stats.wait_s, engine.stats.decode_steps)
            if prof is not None:
                prof.step()
            if "end" in marks:
                raise WindowDone  # the engine drops the rest of the queue

        try:
            engine.run(seqs, on_step=on_step)
        except WindowDone:
            pass

    (t0, h0, w0, d0), (t1, h1, w1, d1) = marks["start"], marks["end"]
    n = args.steps
    print(f"{args.model} {args.workload} graphs={not args.no_cuda_graphs} async={not args.no_async}: "
          f"{n} steps ({d1 - d0} decode) after {args.skip_steps}")
    print(f"wall per step            {(t1 - t0) / n * 1e3:8.3f} ms")
    print(f"host work per step       {(h1 - h0) / n * 1e3:8.3f} ms  (schedule, prepare, plan, launch, resolve)")
    print(f"host blocked per step    {(w1 - w0) / n * 1e3:8.3f} ms  (waiting for sampled tokens)")
    if prof is not None:
        events = prof.key_averages()
        # ProfilerStep* spans the window's steps on the device too: counting it would double the sum.
        device_us = sum(e.self_device_time_total for e in events
                        if e.device_type.name == "CUDA" and not e.key.startswith("ProfilerStep")) / n
        print(f"device kernels per step  {device_us / 1e3:8.3f} ms")
        print(events.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    if args.cprofile:
        pstats.Stats(host_prof).sort_stats("tottime").print_stats(25)
    if args.trace and prof is not None:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
