"""Tensor and data parallelism on CPU: ``torchrun`` (as ``python -m torch.distributed.run``)
with the gloo backend on loopback, tiny float32 models saved with ``save_pretrained``; what each
rank runs is tests/distributed_worker.py. Every result must equal a single process's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _COMMON, model_from_config, reference_generate, tiny_model
from distributed_worker import MAX_NEW, PROMPTS, padded_batch
from transformers import LlamaConfig

from hf_cb.distributed import tensor_parallel
from hf_cb.entrypoints.data_parallel import shard_by_tokens

ROOT = Path(__file__).resolve().parents[1]
SEED = 61


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, *args: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` CPU ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(script), *args]
    # No GPU even where there is one: gloo on CPU, float32.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 120) -> list[dict]:
    """Run ``script`` on ``nproc`` CPU ranks; the JSON lines rank 0 printed."""
    done = launch(script, *args, nproc=nproc, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def by_case(lines: list[dict]) -> dict[str, dict]:
    return {line["case"]: line for line in lines}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=SEED)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed") / "llama"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def greedy(model):
    """Stock `generate`, one prompt at a time."""
    return [reference_generate(model, p, max_new_tokens=m, do_sample=False) for p, m in zip(PROMPTS, MAX_NEW)]


def test_tensor_parallel_equals_one_process(model, model_dir, greedy, tmp_path):
    kv1_dir = tmp_path / "kv1"  # one K/V head: two ranks cannot split it
    model_from_config(LlamaConfig(**{**_COMMON, "num_key_value_heads": 1}), seed=SEED).save_pretrained(kv1_dir)
    got = by_case(torchrun(ROOT / "tests" / "distributed_worker.py", "tp", str(model_dir), str(kv1_dir)))
    for case in ("greedy", "small", "shard", "drop_in", "unseeded", "seeded", "seed", "refused"):
        assert got[case]["agree"], f"the ranks' {case} results differ"

    assert got["greedy"]["result"] == greedy
    assert got["small"]["result"] == [reference_generate(model, p, max_new_tokens=6, do_sample=False)
                                      for p in PROMPTS[:3]]
    assert got["shard"]["result"] == 1  # each rank pages 1 of the model's 2 K/V heads
    ids, mask = padded_batch()
    assert got["drop_in"]["result"] == model.generate(ids, attention_mask=mask, max_new_tokens=6,
                                                      do_sample=False).tolist()
    seeded = model.generate_batch_continuous(PROMPTS, max_new_tokens=8, do_sample=True, seed=11)
    assert got["seeded"]["result"] == [c.token_ids for c in seeded]

    # An OnlineEngine on rank 0 (with an abort, and a request after it went idle), rank 1 following.
    no_eos = model.generate_batch_continuous(PROMPTS, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None)
    assert got["online"]["result"] == [c.token_ids for c in no_eos] + [no_eos[4].token_ids[:4]]

    assert "2 tensor-parallel ranks cannot split into whole heads" in got["refused"]["result"]


@pytest.mark.parametrize("what, reason", [
    ("config", "rank 1 of the tensor-parallel group has"),
    ("request", "rank 1's request 0 differs from rank 0's"),
])
def test_tensor_parallel_rank_that_departs_from_rank_0_stops_with_the_reason(model_dir, what, reason):
    done = launch(ROOT / "tests" / "distributed_worker.py", f"diverge_{what}", str(model_dir), timeout=90)
    assert done.returncode != 0
    assert reason in done.stderr, done.stderr[-4000:]
    assert "not stopped" not in done.stdout


@pytest.mark.parametrize("case, nproc", [("dp", 2), ("tp_dp", 4)], ids=["dp2", "tp2xdp2"])
def test_data_parallel_equals_one_process(model, model_dir, greedy, case, nproc):
    if case == "tp_dp" and not tensor_parallel.shards_can_be_replicated():
        pytest.skip("tensor x data parallelism needs Transformers 5.23 or later (DistributedConfig's dp_replicate_size)")
    got = by_case(torchrun(ROOT / "tests" / "distributed_worker.py", case, str(model_dir), nproc=nproc))
    assert all(line["agree"] for line in got.values()), "ranks got different completions"
    assert got["greedy"]["result"] == greedy
    sampled = model.generate_batch_continuous(PROMPTS, max_new_tokens=8, do_sample=True, seed=5,
                                              num_return_sequences=2)
    assert got["sampled"]["result"] == [c.token_ids for c in sampled]
    assert [len(t) for t in got["unseeded"]["result"]] == [8] * len(PROMPTS)


@pytest.mark.parametrize("script, nproc, args", [
    ("tensor_parallel.py", 2, ()),
    ("tensor_parallel.py", 1, ()),
    ("data_parallel.py", 2, ()),
], ids=["tensor_parallel", "tensor_parallel_one_rank", "data_parallel"])
def test_examples_print_the_completions(script, nproc, args):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from common import tiny_model_and_tokenizer
    finally:
        sys.path.remove(str(ROOT / "examples"))
    lines = torchrun(ROOT / "examples" / script, *args, nproc=nproc)
    model, tok = tiny_model_and_tokenizer("cpu")
    prompts = [line["prompt"] for line in lines]
    assert len(prompts) >= 8
    expected = model.generate_batch_continuous(prompts, tokenizer=tok, max_new_tokens=16, do_sample=False)
    assert [line["token_ids"] for line in lines] == [c.token_ids for c in expected]
    assert [line["text"] for line in lines] == [c.text for c in expected]


def test_shard_by_tokens_balances_and_keeps_order():
    costs = [50, 10, 10, 10, 10, 10, 40, 5, 5]
    shards = shard_by_tokens(costs, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(costs)))
    assert all(s == sorted(s) for s in shards)
    assert [sum(costs[i] for i in s) for s in shards] == [50, 50, 50]
    assert shard_by_tokens([3], 2) == [[0], []]  # a replica may get nothing


class FakeMesh:
    """What `tensor_parallel_group` reads of a DTensor's DeviceMesh."""

    def __init__(self, names, sizes):
        self.mesh_dim_names, self.sizes, self.ndim = names, dict(zip(names or ("",), sizes)), len(sizes)

    def __getitem__(self, name):
        return FakeMesh((name,), (self.sizes[name],))

    def size(self):
        return next(iter(self.sizes.values()))

    def get_group(self):
        return f"group of {self.mesh_dim_names}"


@pytest.mark.parametrize("names, sizes, group", [
    (None, (2,), "group of None"),  # Transformers before 5.23 (5.17 checked): tp_plan's 1-D mesh has no names
    (("tp",), (2,), "group of ('tp',)"),
    (("dp", "tp"), (2, 2), "group of ('tp',)"),
    (("tp",), (1,), None),
    (("fsdp",), (2,), None),
], ids=["unnamed", "tp", "dp_tp", "one_rank", "fsdp_only"])
def test_the_tensor_parallel_group_is_read_from_the_weights_mesh(monkeypatch, names, sizes, group):
    weight = torch.nn.Parameter(torch.zeros(1))
    weight.device_mesh = FakeMesh(names, sizes)
    model = torch.nn.Linear(1, 1)
    model.weight = weight
    monkeypatch.setattr(tensor_parallel.dist, "is_initialized", lambda: True)
    assert tensor_parallel.tensor_parallel_group(model) == group


def test_sharding_config_names_the_transformers_that_tensor_x_data_parallelism_needs(monkeypatch):
    class DistributedConfigOf517:  # Transformers 5.17-5.22: no dp_replicate_size
        def __init__(self, tp_plan=None, tp_size=None):
            self.tp_plan, self.tp_size = tp_plan, tp_size

    monkeypatch.setattr("transformers.distributed.DistributedConfig", DistributedConfigOf517)
    assert tensor_parallel.sharding_config(2).tp_size == 2
    with pytest.raises(ValueError, match=r"2 x 2 ranks\) needs Transformers 5.23 or later"):
        tensor_parallel.sharding_config(2, replicas=2)
