"""Data parallelism: one `generate_batch_continuous` call spread over model replicas.

    torchrun --nproc-per-node 2 examples/data_parallel.py [MODEL]
    accelerate launch --num-processes 2 examples/data_parallel.py [MODEL]
    torchrun --nproc-per-node 4 examples/data_parallel.py [MODEL] --tensor-parallel-size 2

Each replica is one rank with the whole model (GPU ``LOCAL_RANK`` on CUDA, NCCL; gloo on CPU),
or, with ``--tensor-parallel-size T``, a group of T ranks holding a shard each (TP x DP = the
number of ranks). `hf_cb.generate_data_parallel` gives each replica about the same number of
tokens and gathers every completion back, in input order, on every rank; rank 0 prints them as
JSON lines. Without MODEL, a tiny random Llama stands in (each rank saves the same one).
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from common import print_completions, save_tiny_model, word_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_cb
from hf_cb.distributed.tensor_parallel import sharding_config

TEXT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "The three laws of"]


def load(path: str, tp_size: int):
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    if tp_size > 1:  # Transformers starts torch.distributed; FSDP over replicas of 1 rank is plain replication
        config = sharding_config(tp_size, replicas=int(os.environ["WORLD_SIZE"]) // tp_size)
        return AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=dtype)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or save_tiny_model(tmp)
        model = load(path, args.tensor_parallel_size)
        tok = AutoTokenizer.from_pretrained(path)
    prompts = TEXT_PROMPTS if args.model else word_prompts(12)
    outs = hf_cb.generate_data_parallel(model, prompts, tokenizer=tok, max_new_tokens=16, do_sample=False)
    if dist.get_rank() == 0:
        print_completions(prompts, outs)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
