"""Tensor parallelism: every rank holds a shard of the weights and runs the same program.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py [MODEL]

Transformers shards the model at load (``DistributedConfig(tp_plan="auto")``, or the older
``tp_plan="auto"``) and starts torch.distributed: NCCL with GPU ``LOCAL_RANK`` per rank on CUDA,
gloo on CPU. Each rank's engine keeps the K/V pages of its own heads; rank 0 decides the requests,
seeds and sampled tokens, so every rank returns the same completions. Rank 0 prints them as JSON
lines. Without MODEL, a tiny random Llama stands in (each rank saves the same one).
"""

import sys
import tempfile

import torch
import torch.distributed as dist
from common import print_completions, save_tiny_model, word_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.distributed import DistributedConfig

import hf_cb  # noqa: F401 - adds model.generate_batch_continuous

TEXT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = sys.argv[1] if len(sys.argv) > 1 else save_tiny_model(tmp)
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"),
                                                     dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
    prompts = TEXT_PROMPTS if len(sys.argv) > 1 else word_prompts(8)
    outs = model.generate_batch_continuous(prompts, tokenizer=tok, max_new_tokens=16, do_sample=False)
    parallel = dist.is_initialized()  # one process: Transformers starts no process group
    if not parallel or dist.get_rank() == 0:
        print_completions(prompts, outs)
    if parallel:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
