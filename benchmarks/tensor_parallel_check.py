"""Tensor parallelism against one device: greedy tokens under TP, teacher-forced through the whole model.

    python benchmarks/tensor_parallel_check.py save DIR                        # a small random Llama, head dim 64
    torchrun --nproc-per-node 2 benchmarks/tensor_parallel_check.py run DIR > tp2.json
    python benchmarks/tensor_parallel_check.py check DIR tp2.json             # one device, the whole model

``run`` shards DIR over the ranks (Transformers' ``DistributedConfig(tp_plan="auto")``: NCCL and
a GPU a rank on CUDA, gloo on CPU) and prints rank 0's greedy tokens of 8 word prompts as JSON.
``check`` loads the whole model on one device, generates the same, and feeds every token of the
TP run through the plain HF forward: the worst gap between the chosen token's logit and the row's
maximum, as a fraction of the row's range, is the teacher-forced check of the GPU tests. bf16 on
CUDA, float32 elsewhere (where the sequences must also be equal).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.distributed import DistributedConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from common import tiny_model_and_tokenizer, word_prompts  # noqa: E402

import hf_cb  # noqa: E402, F401 - registers the attention function
from hf_cb.distributed.tensor_parallel import tensor_parallel_size  # noqa: E402

MAX_NEW = 32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def save(path: str) -> None:
    """A 2-layer Llama with head dim 64 (FlashInfer's prebuilt kernels), weights large enough
    that greedy decoding does not sit on ties, and the examples' word-level tokenizer."""
    _, tok = tiny_model_and_tokenizer("cpu")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, initializer_range=0.2, vocab_size=512, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)


def generate(model, tok) -> list[list[int]]:
    outs = model.generate_batch_continuous(word_prompts(8), tokenizer=tok, max_new_tokens=MAX_NEW, do_sample=False)
    return [c.token_ids for c in outs]


def run(path: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"), dtype=DTYPE)
    ids = generate(model, AutoTokenizer.from_pretrained(path))
    if dist.get_rank() == 0:
        print(json.dumps({"tensor_parallel_size": tensor_parallel_size(model), "ids": ids}))
    dist.destroy_process_group()


def worst_gap(model, tok, sequences: list[list[int]]) -> float:
    """The largest (max logit - chosen logit) / (max - min) over every token of ``sequences``."""
    worst = 0.0
    for prompt, ids in zip(word_prompts(8), sequences):
        p = tok(prompt, return_tensors="pt").input_ids.to(DEVICE)
        chosen = torch.tensor(ids, device=DEVICE)
        with torch.no_grad():
            logits = model(torch.cat([p, chosen[None]], 1)).logits[0, p.shape[1] - 1:-1].float()
        top, bottom = logits.max(1).values, logits.min(1).values
        worst = max(worst, ((top - logits.gather(1, chosen[:, None])[:, 0]) / (top - bottom)).max().item())
    return worst


def check(path: str, tp_json: str) -> None:
    tp = json.loads(Path(tp_json).read_text().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE, device_map=DEVICE)
    tok = AutoTokenizer.from_pretrained(path)
    one = generate(model, tok)
    parts = [None if a == b else next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
             for a, b in zip(tp["ids"], one)]
    print(json.dumps({
        "device": DEVICE, "tensor_parallel_size": tp["tensor_parallel_size"],
        "tokens": sum(map(len, tp["ids"])), "distinct_tokens": len({t for s in tp["ids"] for t in s}),
        "sequences_equal": parts.count(None), "first_difference": parts,
        "teacher_forced_worst_gap": worst_gap(model, tok, tp["ids"]),
    }))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"save": save, "run": run, "check": check}[command](*args)
