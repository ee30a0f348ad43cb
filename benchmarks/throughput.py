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
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_cb  # noqa: E402

MODELS = {
    "llama-1b": ("LlamaConfig", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        rope_theta=500000.0, max_position_embeddings=4096)),
    "qwen3-0.6b": ("Qwen3Config", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=4096)),
    "llama-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=8192)),
}
# name: (requests, prompt length range, output length range)
WORKLOADS = {
    "mixed": (256, (100, 1024), (100, 1024)),
    "rollouts": (32, (256, 256), (1024, 1024)),
    "prefill": (1000, (1024, 1024), (128, 128)),
    "gsm8k-like": (1319, (60, 130), (256, 256)),
}
ALIASES = {"W1": "mixed", "W2": "rollouts", "W3": "prefill", "W4": "gsm8k-like"}
SYSTEMS = ("hf_cb", "transformers-cb", "transformers-static")
STATIC_BATCH = 128


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(name: str, vocab_size: int, limit: int | None = None) -> Workload:
    """BENCHMARKS.md: Random(0) draws each prompt (its length, then its tokens), then all output
    lengths; token ids are uniform in [100, vocab_size - 100)."""
    n, (p_lo, p_hi), (o_lo, o_hi) = WORKLOADS[name]
    rng = random.Random(0)
    prompts = [[rng.randrange(100, vocab_size - 100) for _ in range(rng.randint(p_lo, p_hi))] for _ in range(n)]
    output_lens = [rng.randint(o_lo, o_hi) for _ in range(n)]
    if limit:
        prompts, output_lens = prompts[:limit], output_lens[:limit]
    return Workload(prompts, output_lens)


def build_model(name: str, dtype: torch.dtype, device: str):
    import transformers

    cls_name, kwargs = MODELS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


# -- systems ------------------------------------------------------------------------------------


def run_hf_cb(model, wl: Workload, engine_config: hf_cb.EngineConfig, progress: bool) -> list[list[int]]:
    outs = model.generate_batch_continuous(
        wl.prompts, max_new_tokens=wl.output_lens, do_sample=False, eos_token_id=None,
        engine_config=engine_config, progress=progress,
    )
    return [o.token_ids for o in outs]


def run_transformers_cb(model, wl: Workload, progress: bool) -> list[list[int]]:
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(wl.output_lens), eos_token_id=None, pad_token_id=0)
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
    outs = []
    for start in tqdm(range(0, len(wl.prompts), STATIC_BATCH), disable=not progress, desc="transformers-static"):
        prompts = wl.prompts[start : start + STATIC_BATCH]
        lens = wl.output_lens[start : start + STATIC_BATCH]
        width, n = max(map(len, prompts)), max(lens)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
        outs += [row[width : width + k].tolist() for row, k in zip(out, lens)]
    return outs


# -- roofline -----------------------------------------------------------------------------------


def measure_bandwidth(device: str) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    src = torch.randn(1 << 30, dtype=torch.float32, device=device)  # 4 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src))


def measure_matrix_rate(device: str, dtype: torch.dtype) -> float:
    """bf16 FLOP/s of an 8192^3 matmul on random data."""
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    return 2 * 8192**3 / median_seconds(lambda: a @ b)


def median_seconds(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median of CUDA-event-timed runs of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def roofline_tokens_per_s(model, wl: Workload, bandwidth: float, matrix_rate: float) -> float:
    """Every request admitted at once. Prefill: 2 x params x prompt tokens of matrix work. Decode
    step k (feeding each active request's k-th output token): read all weights once plus the K/V
    of every active token; 2 x params x active requests of matrix work; the larger time wins."""
    params = sum(p.numel() for p in model.parameters())
    elem = next(model.parameters()).element_size()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem
    total = 2 * params * wl.prompt_tokens / matrix_rate
    by_len = sorted(zip(wl.output_lens, map(len, wl.prompts)))
    active_ctx = sum(len(p) for p in wl.prompts)  # tokens in the cache of the active requests
    active = len(by_len)
    i = 0
    for k in range(1, max(wl.output_lens)):
        while i < len(by_len) and by_len[i][0] <= k:  # requests with k outputs are done
            active -= 1
            active_ctx -= by_len[i][1] + by_len[i][0] - 1
            i += 1
        active_ctx += active  # this step's token joins the context of every active request
        step_bytes = params * elem + active_ctx * kv_per_token
        total += max(step_bytes / bandwidth, 2 * params * active / matrix_rate)
    return wl.output_tokens / total


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
    run(warm)  # unmeasured: compilation, graph capture, first kernel loads
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    outs = run(wl)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    produced = [len(o) for o in outs]
    if produced != wl.output_lens:
        bad = next(i for i, (a, b) in enumerate(zip(produced, wl.output_lens)) if a != b)
        raise RuntimeError(f"{system}: request {bad} produced {produced[bad]} tokens, asked {wl.output_lens[bad]}")
    return Result(
        system, seconds, wl.output_tokens / seconds, (wl.output_tokens + wl.prompt_tokens) / seconds,
        torch.cuda.max_memory_allocated() / 2**30,
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="llama-1b", help="model shape (random weights)")
    p.add_argument("--workload", default="mixed", help=f"one of {list(WORKLOADS)} or W1..W4")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--skip", nargs="*", default=[], choices=SYSTEMS[1:], help="baselines not to run (the table says so)")
    p.add_argument("--limit", type=int, default=None, help="only the first N requests (smoke runs)")
    p.add_argument("--warmup-requests", type=int, default=8, help="requests in each system's unmeasured warm-up run")
    p.add_argument("--page-size", type=int, default=hf_cb.EngineConfig.page_size)
    p.add_argument("--max-num-seqs", type=int, default=hf_cb.EngineConfig.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=hf_cb.EngineConfig.max_num_batched_tokens)
    p.add_argument("--num-pages", type=int, default=None, help="KV pages (default: sized from free memory)")
    p.add_argument("--prefill-backend", choices=["auto", "fa2", "fa3"], default=hf_cb.EngineConfig.prefill_backend)
    p.add_argument("--attention-backend", choices=["auto", "flashinfer", "torch"], default="auto")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    p.add_argument("--no-async", action="store_true", help="no overlap of host scheduling with the GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model forward")
    p.add_argument("--decode-tensor-cores", choices=["auto", "on", "off"], default="auto")
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
    warm = Workload(wl.prompts[: args.warmup_requests], [min(16, n) for n in wl.output_lens[: args.warmup_requests]])
    bandwidth, matrix_rate = measure_bandwidth("cuda"), measure_matrix_rate("cuda", torch.bfloat16)
    roofline = roofline_tokens_per_s(model, wl, bandwidth, matrix_rate)
    engine_config = hf_cb.EngineConfig(
        page_size=args.page_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, num_pages=args.num_pages,
        prefill_backend=args.prefill_backend, attention_backend=args.attention_backend,
        cuda_graphs=not args.no_cuda_graphs, async_scheduling=not args.no_async, compile=args.compile,
        decode_tensor_cores={"auto": None, "on": True, "off": False}[args.decode_tensor_cores],
    )

    results = [measure("hf_cb", lambda w: run_hf_cb(model, w, engine_config, progress), wl, warm)]
    engine = hf_cb.get_engine(model)
    results[0].extra = {
        "backend": type(engine.backend).__name__, "num_pages": engine.manager.num_pages,
        "preemptions": engine.scheduler.num_preemptions, "host": engine.stats.summary(),
    }
    hf_cb.release(model)
    torch.cuda.empty_cache()
    baselines = {"transformers-cb": run_transformers_cb, "transformers-static": run_transformers_static}
    for name, fn in baselines.items():
        if name in args.skip:
            results.append(Result(name, note="skipped (--skip)"))
            continue
        results.append(measure(name, lambda w, fn=fn: fn(model, w, progress), wl, warm))
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


if __name__ == "__main__":
    main()
