"""Throughput of hf_cb against Transformers' own generation paths, on the workloads of
BENCHMARKS.md, in one run on one model object. Prints one table and writes it as JSON.

    python benchmarks/throughput.py --model llama-1b --workload mixed
    python benchmarks/throughput.py --model qwen3-0.6b --workload mixed --skip transformers-static

Systems: ``hf_cb`` (``generate_batch_continuous``), ``transformers-cb`` (``init_continuous_batching``,
one ``add_request`` per request) and ``transformers-static`` (``generate`` on left-padded batches of
128, every row generating the batch's longest output; only requested tokens count). Each system
runs once unmeasured on a few requests first (compilation, graph capture, first kernel loads).
The roofline is the fastest any engine could run the workload on this GPU, from the copy
bandwidth and bf16 matrix rate measured in the same run (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config_args import parse_config  # noqa: E402
from workloads import (  # noqa: E402,F401 - the other scripts import these from here
    ALIASES,
    MODELS,
    WORKLOADS,
    Workload,
    build_model,
    make_workload,
    measure_bandwidth,
    measure_matrix_rate,
    median_seconds,
    roofline_tokens_per_s,
)

import hf_cb  # noqa: E402

SYSTEMS = ("hf_cb", "transformers-cb", "transformers-static")
STATIC_BATCH = 128


# -- systems ------------------------------------------------------------------------------------


def run_hf_cb(model, wl: Workload, engine_config: hf_cb.EngineConfig, progress: bool) -> list[list[int]]:
    """The workload in one `generate_batch_continuous` call, from an empty prefix cache (a
    warm-up run must not hand the measured one its prefixes)."""
    hf_cb.reset_prefix_cache(model)
    outs = model.generate_batch_continuous(
        wl.prompts, max_new_tokens=wl.output_lens, eos_token_id=None, num_return_sequences=wl.n,
        engine_config=engine_config, progress=progress, **sampling(wl),
    )
    return [o.token_ids for o in outs]


def sampling(wl: Workload) -> dict:
    return {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if wl.do_sample else {"do_sample": False}


def run_transformers_cb(model, wl: Workload, progress: bool) -> list[list[int]]:
    from transformers import GenerationConfig

    wl = wl.expanded()
    config = GenerationConfig(max_new_tokens=max(wl.output_lens), eos_token_id=None, pad_token_id=0, **sampling(wl))
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(wl.prompts, wl.output_lens)]
        results = {}
        with tqdm(total=len(ids), disable=not progress, desc="transformers-cb", unit="req") as bar:
            while len(results) < len(ids):
                r = manager.get_result(timeout=600)
                if r is None:
                    raise RuntimeError("transformers continuous batching returned no result")
                if r.is_finished():
                    results[r.request_id] = r.generated_tokens
                    bar.update(1)
    finally:
        manager.stop(block=True)
    return [results[i] for i in ids]


def run_transformers_static(model, wl: Workload, progress: bool) -> list[list[int]]:
    outs, wl = [], wl.expanded()
    for start in tqdm(range(0, len(wl.prompts), STATIC_BATCH), disable=not progress, desc="transformers-static"):
        prompts = wl.prompts[start : start + STATIC_BATCH]
        lens = wl.output_lens[start : start + STATIC_BATCH]
        width, n = max(map(len, prompts)), max(lens)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                             pad_token_id=0, **sampling(wl))
        outs += [row[width : width + k].tolist() for row, k in zip(out, lens)]
    return outs


# -- driver -------------------------------------------------------------------------------------


@dataclass
class Result:
    system: str
    seconds: float | None = None
    output_tok_s: float | None = None
    total_tok_s: float | None = None
    peak_mem_gib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def measure(system: str, run, wl: Workload, warm: Workload) -> Result:
    start = time.perf_counter()
    run(warm)  # unmeasured: compilation, graph capture, first kernel loads
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    outs = run(wl)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    produced, asked = [len(o) for o in outs], wl.completion_lens
    if produced != asked:
        bad = next(i for i, (a, b) in enumerate(zip(produced, asked)) if a != b) if len(produced) == len(asked) else -1
        raise RuntimeError(f"{system}: completion {bad} produced {produced[bad]} tokens, asked {asked[bad]}")
    return Result(
        system, seconds, wl.output_tokens / seconds, (wl.output_tokens + wl.prompt_tokens) / seconds,
        torch.cuda.max_memory_allocated() / 2**30, extra={"warmup_s": warmup_s},
    )


def compile_phases() -> dict[str, float]:
    """Seconds spent so far in this process in each phase of torch.compile (Dynamo's tracing,
    AOTAutograd, Inductor, cache loads), the slowest first."""
    import torch._dynamo.utils

    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    return dict(sorted(((n, float(v)) for n, v in zip(names, values)), key=lambda kv: -kv[1]))


def measure_hf_cb(name: str, model, wl: Workload, warm: Workload, engine_config: hf_cb.EngineConfig,
                  progress: bool) -> Result:
    """`measure` of hf_cb, with the engine's build time and its first call (the warm-up run:
    compilation, graph capture) timed apart."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine = hf_cb.get_engine(model, engine_config)
    build_s = time.perf_counter() - start
    result = measure(name, lambda w: run_hf_cb(model, w, engine_config, progress), wl, warm)
    result.extra = {
        "engine_build_s": build_s, "first_call_s": result.extra["warmup_s"], "startup_s": engine.startup_s,
        "compile_phases_s": compile_phases(),
        "backend": type(engine.backend).__name__, "num_pages": engine.manager.num_pages,
        "max_num_seqs": engine.config.max_num_seqs,
        "preemptions": engine.scheduler.num_preemptions, "host": engine.stats.summary(),
        "state_bytes_per_seq": getattr(engine, "slot_bytes", 0) if engine.shape.stateful else 0,
    }
    hf_cb.release(model)
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="llama-1b", help="model shape (random weights)")
    p.add_argument("--workload", default="mixed", help=f"one of {list(WORKLOADS)} or W1..W6")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--skip", nargs="*", default=[], choices=SYSTEMS[1:], help="baselines not to run (the table says so)")
    p.add_argument("--limit", type=int, default=None, help="only the first N requests (smoke runs)")
    p.add_argument("--warmup-requests", type=int, default=8, help="requests in each system's unmeasured warm-up run")
    p.add_argument("--page-size", type=int, default=hf_cb.EngineConfig.page_size)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="default: the engine's (1024 on a GPU of 70 GiB or more, else 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=hf_cb.EngineConfig.max_num_batched_tokens)
    p.add_argument("--num-pages", type=int, default=None, help="KV pages (default: sized from free memory)")
    p.add_argument("--prefill-backend", choices=["auto", "fa2", "fa3"], default=hf_cb.EngineConfig.prefill_backend)
    p.add_argument("--attention-backend", choices=["auto", "flashinfer", "torch"], default="auto")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    p.add_argument("--no-async", action="store_true", help="no overlap of host scheduling with the GPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the forward (default: the engine decides; on with CUDA graphs)")
    p.add_argument("--prefix-caching", choices=["on", "off", "both"], default="on",
                   help="both: hf_cb with and without prefix caching, in the same run")
    p.add_argument("--fuse-projections", choices=["off", "on", "both"], default="off",
                   help="q/k/v and gate/up as one GEMM each; both: also a run without")
    p.add_argument("--decode-tensor-cores", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--kv-layout", choices=["auto", "NHD", "HND"], default=hf_cb.EngineConfig.kv_layout)
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default=hf_cb.EngineConfig.kv_cache_dtype,
                   help="fp8: e4m3 pages, read by XQA on Hopper (changes the numbers; opt-in)")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar="FIELD=VALUE",
                   help="also run hf_cb with these EngineConfig fields changed (repeatable), in the same run")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure hf_cb's runs this many times, in alternating order (A B, then B A, ...), and "
                        "print each one's median: on W1 and W3 the run measured first in a process was 1-2 %% "
                        "slower than the same configuration measured later")
    p.add_argument("--json", default=None, help="write the results here (default: stdout only)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    workload = ALIASES.get(args.workload, args.workload)
    if workload not in WORKLOADS:
        p.error(f"unknown workload {args.workload!r}")
    if not torch.cuda.is_available():
        p.error("the benchmark needs a CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    progress = not args.no_progress

    model = build_model(args.model, dtype, "cuda")
    wl = make_workload(workload, model.config.vocab_size, args.limit)
    warm = wl.head(args.warmup_requests, max_output=16)
    bandwidth, matrix_rate = measure_bandwidth("cuda"), measure_matrix_rate("cuda", torch.bfloat16)
    engine_config = hf_cb.EngineConfig(
        page_size=args.page_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, num_pages=args.num_pages,
        prefill_backend=args.prefill_backend, attention_backend=args.attention_backend,
        cuda_graphs=not args.no_cuda_graphs, async_scheduling=not args.no_async, compile=args.compile,
        decode_tensor_cores={"auto": None, "on": True, "off": False}[args.decode_tensor_cores],
        enable_prefix_caching=args.prefix_caching != "off",
        fuse_projections=args.fuse_projections != "off", kv_layout=args.kv_layout,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    # hf_cb's runs, in order: the configuration asked for, then each variant of it.
    runs = [("hf_cb", engine_config)]
    if args.prefix_caching == "both":
        runs.append(("hf_cb, no prefix caching", replace(engine_config, enable_prefix_caching=False)))
    if args.fuse_projections == "both":
        runs.append(("hf_cb, projections not fused", replace(engine_config, fuse_projections=False)))
    runs += [(f"hf_cb, {' '.join(items)}", replace(engine_config, **parse_config(items))) for items in args.variant]

    results = []
    for i in range(args.repeat):
        for name, config in runs if i % 2 == 0 else runs[::-1]:
            results.append(measure_hf_cb(name, model, wl, warm, config, progress))
            results[-1].extra["repeat"] = i
    # Hybrid models: each sequence's recurrent state, read and written every step, as the engine keeps it.
    roofline = roofline_tokens_per_s(model, wl, bandwidth, matrix_rate, results[0].extra["state_bytes_per_seq"])
    baselines = {"transformers-cb": run_transformers_cb, "transformers-static": run_transformers_static}
    for name, fn in baselines.items():
        if name in args.skip:
            results.append(Result(name, note="skipped (--skip)"))
            continue
        try:
            results.append(measure(name, lambda w, fn=fn: fn(model, w, progress), wl, warm))
        except Exception as error:  # Transformers' continuous batching crashes on hybrid models (#48305)
            results.append(Result(name, note=f"failed: {type(error).__name__}: {str(error)[:200]}"))
        torch.cuda.empty_cache()

    report = {
        "model": args.model, "workload": workload, "dtype": args.dtype, "requests": len(wl.prompts),
        "prompt_tokens": wl.prompt_tokens, "output_tokens": wl.output_tokens,
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "flashinfer": _flashinfer_version(),
        "bandwidth_tb_s": bandwidth / 1e12, "matrix_tflop_s": matrix_rate / 1e12,
        "roofline_output_tok_s": roofline, "engine_config": asdict(engine_config),
        "command": " ".join(["python", "benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "results": [asdict(r) for r in results],
    }
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _flashinfer_version() -> str | None:
    try:
        import flashinfer

        return flashinfer.__version__
    except ImportError:
        return None


def print_table(report: dict) -> None:
    hf = report["results"][0]
    print(
        f"\n{report['model']} {report['workload']} {report['dtype']}: {report['requests']} requests, "
        f"{report['prompt_tokens']} prompt + {report['output_tokens']} output tokens | {report['gpu']}, "
        f"torch {report['torch']}, transformers {report['transformers']}, flashinfer {report['flashinfer']}\n"
        f"roofline {report['roofline_output_tok_s']:,.0f} output tok/s "
        f"({report['bandwidth_tb_s']:.2f} TB/s, {report['matrix_tflop_s']:.0f} TFLOP/s measured)"
    )
    print("| system | output tok/s | total tok/s | hf_cb speed-up | peak GPU mem (GiB) | fraction of roofline |")
    print("|---|---|---|---|---|---|")
    for r in report["results"]:
        if r["output_tok_s"] is None:
            print(f"| {r['system']} | {r['note']} | | | | |")
            continue
        speedup = hf["output_tok_s"] / r["output_tok_s"]
        print(
            f"| {r['system']} | {r['output_tok_s']:,.0f} | {r['total_tok_s']:,.0f} | {speedup:.1f}x | "
            f"{r['peak_mem_gib']:.1f} | {r['output_tok_s'] / report['roofline_output_tok_s']:.3f} |"
        )
    runs: dict[str, list[float]] = {}
    for r in report["results"]:
        if r["output_tok_s"] is not None:
            runs.setdefault(r["system"], []).append(r["output_tok_s"])
    for system, values in runs.items():
        if len(values) > 1:
            print(f"{system}: median {statistics.median(values):,.0f} of {len(values)} runs "
                  f"({', '.join(f'{v:,.0f}' for v in values)})")
    for r in report["results"]:
        if "engine_build_s" in r["extra"]:
            host = r["extra"]["host"]
            hits = host["prefix_hits"] / max(host["prefix_queries"], 1)
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in r["extra"].get("startup_s", {}).items())
            slowest = list(r["extra"].get("compile_phases_s", {}).items())[:4]
            if slowest and slowest[0][1] > 0.5:
                parts += "; compile phases so far: " + ", ".join(f"{k} {v:.1f} s" for k, v in slowest)
            print(f"{r['system']}: engine built in {r['extra']['engine_build_s']:.1f} s ({parts}), first call (warm-up) "
                  f"{r['extra']['first_call_s']:.1f} s, prefix cache hits {hits:.1%} of prompt tokens, "
                  f"{host['steps']} steps")


if __name__ == "__main__":
    main()
