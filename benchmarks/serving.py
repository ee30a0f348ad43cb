"""S1 (BENCHMARKS.md): W1's requests sent to hf_cb's OpenAI-compatible server over loopback with
``stream=true``, by a load generator in a separate process, arriving as a Poisson process at
each rate and all at once; beside offline `generate_batch_continuous` on the same requests, in
the same run, on the same model object and engine.

    python benchmarks/serving.py --model llama-1b --compile
    python benchmarks/serving.py --model tiny --device cpu --limit 16 --rates 8 inf   # smoke run

Prompts go as token ids through ``/v1/completions`` with ``ignore_eos`` and greedy sampling, so
random weights serve, each request producing exactly its output length. The server detokenizes
with a word-level tokenizer over the model's whole vocabulary (one word per token), so text work
is as for a real model. Per rate: output tokens/s (first request sent to last token received),
time to first token and time between tokens (between consecutive streamed chunks), p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from throughput import MODELS, build_model, make_workload  # noqa: E402

from hf_cb.cli.main import add_engine_args, engine_config_from  # noqa: E402

TINY = ("LlamaConfig", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096))


def word_tokenizer(vocab_size: int):
    """One word per token id (``w5 w6``), decoded with spaces: the server's text work per token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


# -- the load generator (a separate process) ----------------------------------------------------


async def _one(session, url: str, prompt: list[int], max_tokens: int, delay: float, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    sent = time.perf_counter()
    chunks: list[tuple[float, int]] = []  # (arrival, tokens in the chunk)
    async with session.post(url, json=body) as response:
        if response.status != 200:
            return {"error": f"HTTP {response.status}: {(await response.read())[:300]!r}"}
        async for line in response.content:  # one server-sent event line at a time
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            text = json.loads(line[6:])["choices"][0]["text"]
            if text:  # one word per token
                chunks.append((time.perf_counter(), len(text.split())))
    if not chunks:
        return {"error": "no tokens"}
    times = [t for t, _ in chunks]
    return {"sent": sent, "ttft": times[0] - sent, "gaps": [b - a for a, b in zip(times, times[1:])],
            "end": times[-1], "tokens": sum(n for _, n in chunks), "chunks": len(chunks)}


async def _load(url: str, prompts, output_lens, rate: float, seed: int) -> list[dict]:
    # aiohttp, as vLLM's serving benchmark: a client several times cheaper per request and per
    # chunk than httpx, so that the load generator does not become what is measured.
    import aiohttp

    rng, delays, t = random.Random(seed), [], 0.0
    for _ in prompts:
        delays.append(t)
        t += rng.expovariate(rate) if rate != float("inf") else 0.0
    connector = aiohttp.TCPConnector(limit=0)  # one connection per request in flight
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        return await asyncio.gather(*(_one(session, url, p, n, d, t0) for p, n, d in zip(prompts, output_lens, delays)))


def _load_process(url, prompts, output_lens, rate, seed, queue) -> None:
    queue.put(asyncio.run(_load(url, prompts, output_lens, rate, seed)))


def run_load(url: str, prompts, output_lens, rate: float, seed: int = 0) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=(url, prompts, output_lens, rate, seed, queue))
    proc.start()
    results = queue.get()
    proc.join()
    return results


# -- scoring ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def score(rate: float, results: list[dict], output_lens: list[int]) -> dict:
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    wrong = [(r["tokens"], n) for r, n in zip(results, output_lens) if r["tokens"] != n]
    if wrong:
        raise RuntimeError(f"{len(wrong)} requests got the wrong number of tokens, e.g. {wrong[0]}")
    start, end = min(r["sent"] for r in results), max(r["end"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    ttfts = [r["ttft"] for r in results]
    return {
        "rate": "all at once" if rate == float("inf") else rate, "seconds": end - start,
        "output_tok_s": sum(output_lens) / (end - start),
        "ttft_p50_ms": 1e3 * percentile(ttfts, 50), "ttft_p99_ms": 1e3 * percentile(ttfts, 99),
        "tbt_p50_ms": 1e3 * percentile(gaps, 50), "tbt_p99_ms": 1e3 * percentile(gaps, 99),
        "tokens_per_chunk": sum(output_lens) / sum(r["chunks"] for r in results),
    }


# -- driver -------------------------------------------------------------------------------------


def offline(model, prompts, output_lens, engine_config) -> dict:
    sync = torch.cuda.synchronize if torch.cuda.is_available() and model.device.type == "cuda" else (lambda: None)
    kwargs = dict(do_sample=False, eos_token_id=None, engine_config=engine_config, progress=False)
    model.generate_batch_continuous(prompts[:8], max_new_tokens=[min(16, n) for n in output_lens[:8]], **kwargs)
    sync()
    start = time.perf_counter()
    outs = model.generate_batch_continuous(prompts, max_new_tokens=output_lens, **kwargs)
    sync()
    seconds = time.perf_counter() - start
    assert [len(o.token_ids) for o in outs] == output_lens
    return {"seconds": seconds, "output_tok_s": sum(output_lens) / seconds}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[*MODELS, "tiny"], default="llama-1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--rates", nargs="+", type=float, default=[4, 16, 64, float("inf")], help="requests/s; inf: all at once")
    p.add_argument("--limit", type=int, default=None, help="only the first N requests of W1 (smoke runs)")
    p.add_argument("--json", default=None, help="write the results here")
    add_engine_args(p)
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    if args.model == "tiny":
        MODELS["tiny"] = TINY
    model = build_model(args.model, dtype, args.device)
    wl = make_workload("mixed", model.config.vocab_size, args.limit)
    engine_config = engine_config_from(args)

    from hf_cb.entrypoints.online import OnlineEngine
    from hf_cb.server import HTTPServer

    report = {"model": args.model, "workload": "S1 (W1 requests)", "requests": len(wl.prompts),
              "output_tokens": wl.output_tokens, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "engine_config": vars(engine_config) if hasattr(engine_config, "__dict__") else str(engine_config),
              "command": " ".join(["python", "benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])])}
    report["offline"] = offline(model, wl.prompts, wl.output_lens, engine_config)
    print(f"offline generate_batch_continuous: {report['offline']['output_tok_s']:,.0f} output tok/s", flush=True)

    online = OnlineEngine(model, engine_config)
    report["server"] = []
    with HTTPServer(online, word_tokenizer(model.config.vocab_size), model_name="bench", port=0, log_level="warning") as server:
        url = f"{server.url}/v1/completions"
        run_load(url, wl.prompts[:8], [min(16, n) for n in wl.output_lens[:8]], float("inf"))  # warm-up
        for rate in args.rates:
            row = score(rate, run_load(url, wl.prompts, wl.output_lens, rate), wl.output_lens)
            row["vs_offline"] = row["output_tok_s"] / report["offline"]["output_tok_s"]
            report["server"].append(row)
            print(json.dumps(row), flush=True)
    online.shutdown()
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


def print_table(report: dict) -> None:
    print(f"\nS1, {report['model']}, {report['requests']} requests, {report['output_tokens']} output tokens | "
          f"{report['device']}, torch {report['torch']}")
    print(f"offline generate_batch_continuous: {report['offline']['output_tok_s']:,.0f} output tok/s")
    print("| arrival rate (req/s) | output tok/s | vs offline | TTFT p50 / p99 (ms) | TBT p50 / p99 (ms) | tokens per chunk |")
    print("|---|---|---|---|---|---|")
    for r in report["server"]:
        print(f"| {r['rate']} | {r['output_tok_s']:,.0f} | {r['vs_offline']:.2f} | {r['ttft_p50_ms']:.0f} / "
              f"{r['ttft_p99_ms']:.0f} | {r['tbt_p50_ms']:.1f} / {r['tbt_p99_ms']:.1f} | {r['tokens_per_chunk']:.2f} |")


if __name__ == "__main__":
    main()
