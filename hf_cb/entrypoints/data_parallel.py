"""Data parallelism offline: one `generate_batch_continuous` call spread over the model replicas
of a torch.distributed job (one process per GPU, or one tensor-parallel group per replica, under
``torchrun`` or ``accelerate launch``).

Every rank calls `generate_data_parallel` with the same arguments. Rank 0 decides the requests
and the seeds of unseeded ones; they are sharded so that each replica gets about the same number
of tokens (prompt plus ``max_new_tokens``); each replica runs its shard; every rank gets all the
completions back, in input order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from transformers import GenerationConfig

from hf_cb.core.sequence import Completion
from hf_cb.distributed.tensor_parallel import broadcast_object, tensor_parallel_group
from hf_cb.entrypoints.generation_args import per_input, prompts_from_inputs
from hf_cb.sampling.params import random_seed

_cpu_groups: dict[Any, Any] = {}


def shard_by_tokens(costs: list[int], num_shards: int) -> list[list[int]]:
    """Indices of ``costs`` per shard, the shards' sums about equal: the largest first, each to
    the shard with the least so far (LPT: within 4/3 of the best split). Each shard's indices
    ascend, so a replica runs its requests in input order."""
    loads, shards = [0] * num_shards, [[] for _ in range(num_shards)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        shard = min(range(num_shards), key=lambda s: (loads[s], s))
        shards[shard].append(i)
        loads[shard] += costs[i]
    return [sorted(s) for s in shards]


def generate_data_parallel(model: torch.nn.Module, inputs: Any, generation_config: GenerationConfig | None = None,
                           *, tokenizer: Any = None, group: Any = None, **kwargs: Any) -> list[Completion]:
    """`generate_batch_continuous` over every replica of ``group`` (default: all ranks); the
    same arguments, the same completions in the same order, on every rank. A replica is one
    rank, or one tensor-parallel group (all of whose ranks run its shard). Without
    torch.distributed this is `generate_batch_continuous`."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return model.generate_batch_continuous(inputs, generation_config, tokenizer=tokenizer, **kwargs)
    control = _cpu_group(group)
    prompts = prompts_from_inputs(inputs, tokenizer, kwargs.pop("attention_mask", None))
    max_new = per_input("max_new_tokens", kwargs.pop("max_new_tokens", None), len(prompts))
    seeds = [random_seed() if s is None else s for s in per_input("seed", kwargs.pop("seed", None), len(prompts))]
    # One rank decides: every replica works on rank 0's requests, with rank 0's seeds.
    prompts, max_new, seeds = broadcast_object((prompts, max_new, seeds), control)
    replica, num_replicas, is_first = _replica(model, control)
    costs = _token_costs(generation_config or model.generation_config, prompts, max_new)
    mine = shard_by_tokens(costs, num_replicas)[replica]
    outs = model.generate_batch_continuous(
        [prompts[i] for i in mine], generation_config, tokenizer=tokenizer,
        max_new_tokens=[max_new[i] for i in mine], seed=[seeds[i] for i in mine], **{"progress": False, **kwargs},
    ) if mine else []
    gathered: list[Any] = [None] * dist.get_world_size(control)
    dist.all_gather_object(gathered, (mine, outs) if is_first else None, group=control)
    by_input: list[list[Completion]] = [[] for _ in prompts]
    for indices, completions in filter(None, gathered):
        n = len(completions) // max(len(indices), 1)  # num_return_sequences
        for k, i in enumerate(indices):
            by_input[i] = completions[k * n : (k + 1) * n]
    return [c for cs in by_input for c in cs]


def _token_costs(config: GenerationConfig, prompts: list[list[int]], max_new: list[int | None]) -> list[int]:
    """Each request's tokens: its prompt plus what it may generate (as `params_from_config` reads it)."""
    return [
        len(p) + (m if m is not None else config.max_new_tokens or max(config.max_length - len(p), 0))
        for p, m in zip(prompts, max_new)
    ]


def _replica(model: torch.nn.Module, control: Any) -> tuple[int, int, bool]:
    """(this rank's replica, the number of replicas, whether it is its replica's first rank).
    Replicas are numbered by their first rank."""
    tp = tensor_parallel_group(model)
    first = dist.get_global_rank(tp, 0) if tp is not None else dist.get_rank()
    firsts: list[Any] = [None] * dist.get_world_size(control)
    dist.all_gather_object(firsts, first, group=control)
    order = sorted(set(firsts))
    return order.index(first), len(order), first == dist.get_rank()


def _cpu_group(group: Any) -> Any:
    """``group`` itself if it is gloo, else a gloo group of its ranks (made once): objects
    travel on the host, and an NCCL group would need each rank's current device set."""
    group = group or dist.group.WORLD
    if dist.get_backend(group) == "gloo":
        return group
    if group not in _cpu_groups:
        _cpu_groups[group] = dist.new_group(dist.get_process_group_ranks(group), backend="gloo")
    return _cpu_groups[group]
