"""What each rank runs under ``torchrun`` for tests/test_distributed.py (gloo, float32, CPU).

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py CASE MODEL_DIR [...]

CASE ``tp``: tensor-parallel offline generation, an OnlineEngine on rank 0 with rank 1
following, and the refusal of a model with fewer K/V heads than ranks (MODEL_DIR KV1_DIR);
``dp``: `generate_data_parallel` of a whole model per rank; ``tp_dp``: of tensor-parallel
replicas (4 ranks, TP 2 x DP 2); ``diverge_config`` / ``diverge_request``: rank 1 builds its
engine with another config, or asks for another prompt, and must stop with the reason. Rank 0 prints one JSON line per result; ``agree`` says whether
every rank computed the same.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import hf_cb
from hf_cb.entrypoints.online import Notifier, OnlineEngine, iterate
from hf_cb.sampling.params import SamplingParams, random_seed

warnings.filterwarnings("ignore", category=FutureWarning)  # tp_plan= as a keyword is deprecated
PROMPTS = [[(7 * i + 3 * j) % 500 + 3 for j in range(4 + 9 * i)] for i in range(5)]
MAX_NEW = [12, 5, 9, 16, 7]
SMALL = hf_cb.EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, num_pages=8, page_size=4)


def emit(case: str, result) -> None:
    """Rank 0 prints ``result`` and whether every rank has the same."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    if dist.get_rank() == 0:
        print(json.dumps({"case": case, "result": result, "agree": all(r == result for r in everyone)}), flush=True)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the first left-padded, for the drop-in `generate`."""
    ids = torch.tensor([[0] * 4 + PROMPTS[0], PROMPTS[2][:8]])
    return ids, (torch.arange(8) >= torch.tensor([[4], [0]])).long()


def tokens(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


def tensor_parallel(model_dir: str, kv1_dir: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32)
    emit("greedy", tokens(model.generate_batch_continuous(PROMPTS, max_new_tokens=MAX_NEW, do_sample=False)))
    # Chunked prefill, a 2-sequence batch and preemption (8 pages of 4 tokens).
    emit("small", tokens(model.generate_batch_continuous(PROMPTS[:3], max_new_tokens=6, do_sample=False,
                                                         engine_config=SMALL)))
    emit("shard", hf_cb.get_engine(model).shape.num_kv_heads)
    hf_cb.release(model)  # back to the default config
    hf_cb.enable(model)
    ids, mask = padded_batch()
    emit("drop_in", model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False).tolist())
    torch.manual_seed(dist.get_rank())  # unseeded requests: rank 0's seeds must win
    emit("unseeded", tokens(model.generate_batch_continuous(PROMPTS, max_new_tokens=8, do_sample=True)))
    emit("seeded", tokens(model.generate_batch_continuous(PROMPTS, max_new_tokens=8, do_sample=True, seed=11)))
    engine = hf_cb.get_engine(model)
    seq = engine.add_request(PROMPTS[0], SamplingParams(2, do_sample=True), seed=random_seed())
    engine.run([seq])
    emit("seed", seq.seed)  # each rank drew its own; rank 0's is taken
    online(model)
    try:
        hf_cb.get_engine(AutoModelForCausalLM.from_pretrained(kv1_dir, tp_plan="auto", dtype=torch.float32))
        emit("refused", None)
    except hf_cb.ModelNotSupported as error:
        emit("refused", str(error))


def online(model) -> None:
    """Rank 0 serves requests as they come (an OnlineEngine); rank 1 follows its steps."""
    engine = hf_cb.get_engine(model, hf_cb.EngineConfig())
    if dist.get_rank() != 0:
        engine.follow()
        emit("online", None)
        return
    server = OnlineEngine(model)
    notifier = Notifier()  # read together
    streams = [server.submit(p, SamplingParams(m), notifier=notifier) for p, m in zip(PROMPTS, MAX_NEW)]
    aborted = server.submit(PROMPTS[0], SamplingParams(200))
    aborted.abort()
    got = [[] for _ in streams]
    for i, out in iterate(streams):
        got[i] += out.token_ids
    late = server.submit(PROMPTS[4], SamplingParams(4))  # after the loop went idle
    got.append([t for out in late for t in out.token_ids])
    server.shutdown()
    engine.tp.stop()
    emit("online", got)


def data_parallel(model_dir: str, tensor_parallel: bool) -> None:
    if tensor_parallel:
        from hf_cb.distributed.tensor_parallel import sharding_config

        config = sharding_config(2, replicas=2)
        model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=config, dtype=torch.float32)
    else:
        dist.init_process_group("gloo")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    emit("greedy", tokens(hf_cb.generate_data_parallel(model, PROMPTS, max_new_tokens=MAX_NEW, do_sample=False)))
    torch.manual_seed(dist.get_rank())
    sampled = hf_cb.generate_data_parallel(model, PROMPTS, max_new_tokens=8, do_sample=True, seed=5,
                                           num_return_sequences=2)
    emit("sampled", tokens(sampled))
    unseeded = hf_cb.generate_data_parallel(model, PROMPTS, max_new_tokens=8, do_sample=True)
    emit("unseeded", tokens(unseeded))


def diverge(model_dir: str, what: str) -> None:
    """Rank 1 departs from rank 0; it must raise, naming how, before any collective mismatches."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32)
    rank = dist.get_rank()
    if what == "config":
        hf_cb.get_engine(model, SMALL if rank == 1 else hf_cb.EngineConfig())
    else:
        prompts = [p[::-1] for p in PROMPTS] if rank == 1 else PROMPTS
        model.generate_batch_continuous(prompts, max_new_tokens=4, do_sample=False)
    emit("diverged", "not stopped")


def main() -> None:
    case, *dirs = sys.argv[1:]
    if case == "tp":
        tensor_parallel(*dirs)
    elif case.startswith("diverge_"):
        diverge(dirs[0], case.removeprefix("diverge_"))
    else:
        data_parallel(dirs[0], tensor_parallel=case == "tp_dp")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
