"""What `hf_cb.sleep` frees and what it and `hf_cb.wake_up` cost, on a model shape of
BENCHMARKS.md (random weights), with the engine a trainer would keep on its model.

    python benchmarks/sleep_wake.py --model llama-1b --compile
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from throughput import MODELS, build_model, make_workload  # first: puts the repository on sys.path

import hf_cb


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="llama-1b")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the forward (default: the engine decides; on with CUDA graphs)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model = build_model(args.model, torch.bfloat16, "cuda")
    wl = make_workload("W2", model.config.vocab_size).head(32, max_output=64)
    config = hf_cb.EngineConfig(compile=args.compile)

    def generate() -> None:
        model.generate_batch_continuous(wl.prompts, max_new_tokens=wl.output_lens, do_sample=False,
                                        eos_token_id=None, engine_config=config, progress=False)

    first = timed(generate)  # engine build, compile, graph capture
    rows = []
    for _ in range(args.rounds):
        used = torch.cuda.memory_allocated()
        sleep_s = timed(lambda: hf_cb.sleep(model))
        freed = used - torch.cuda.memory_allocated()
        wake_s = timed(lambda: hf_cb.wake_up(model))
        generate_s = timed(generate)
        rows.append({"sleep_s": sleep_s, "wake_up_s": wake_s, "freed_gib": freed / 2**30,
                     "generate_after_wake_s": generate_s})
    engine = hf_cb.get_engine(model)
    report = {"model": args.model, "compile": args.compile, "gpu": torch.cuda.get_device_name(),
              "first_call_s": first, "kv_pool_gib": engine.num_pages * engine.page_bytes / 2**30,
              "decode_graphs": len(engine.runner.graphs.sizes) if engine.runner.graphs else 0, "rounds": rows}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
