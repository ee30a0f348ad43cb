"""Tensor parallelism: each rank runs an engine over its shard of the model, and rank 0 decides.

Under ``torchrun``, ``AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")`` (or
``distributed_config=DistributedConfig(tp_plan="auto")``) leaves each rank its shard of the
weights: DTensors over the ``"tp"`` dimension of Transformers' device mesh, the all-reduces inside
the model's own forward. Each rank builds its own engine over its shard (a page pool for its own
K/V heads, its own attention kernels), and every rank must run exactly the same steps, or their
collectives would not match.

The scheduler is a deterministic function of the engine's config, its pool size, the requests,
aborts and prefix-cache resets in their order, and the sampled tokens. So rank 0 decides them:

- at build, every rank checks its config against rank 0's and all take the smallest pool;
- at the start of each step, rank 0 broadcasts the requests, aborts and resets made since its
  last step (`TensorParallel.sync`) and the other ranks apply them: a program run by every rank
  (an offline ``generate``) has made the same calls itself, which are checked, and takes rank 0's
  seeds; a follower (`LLMEngine.follow`: a server's other ranks) makes them;
- after sampling, rank 0's tokens are broadcast (on the device's stream), so the ranks agree even
  if their logits differed in the last bit.

With the ops goes a digest of rank 0's last step, which every rank compares with its own: a
divergence raises at once rather than corrupting the caches. Any error in a step is fatal to the
group (the ranks' collectives no longer pair up); torchrun then stops every rank.
"""

from __future__ import annotations

import inspect
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hf_cb.core.config import EngineConfig
from hf_cb.core.scheduler import ScheduledBatch
from hf_cb.core.sequence import Sequence

# Control messages wait in a gloo group of their own: an idle server's followers sit in it until
# rank 0's next step, longer than the 10-30 minute default timeouts. (Just under gloo's 2**31 ms.)
_CONTROL_TIMEOUT = timedelta(days=24)
_STOP = "stop"


class Stopped(Exception):
    """Rank 0 has stopped: a follower's `LLMEngine.follow` returns."""


def tensor_parallel_group(model: torch.nn.Module) -> "dist.ProcessGroup | None":
    """The process group ``model``'s weights are split over (Transformers' ``"tp"`` mesh
    dimension), or None for a model that is whole on this rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    for param in model.parameters():
        mesh = getattr(param, "device_mesh", None)  # a DTensor's
        if mesh is None:
            continue
        names = mesh.mesh_dim_names or ()
        if "tp" in names:
            tp = mesh["tp"]
        elif not names and mesh.ndim == 1:  # Transformers before 5.23 (5.17 checked): an unnamed tp mesh
            tp = mesh
        else:
            continue
        return tp.get_group() if tp.size() > 1 else None
    return None


def shards_can_be_replicated() -> bool:
    """Whether this Transformers can copy tensor-parallel shards over replicas (TP x DP):
    ``DistributedConfig``'s ``dp_replicate_size``, new in 5.23."""
    from transformers.distributed import DistributedConfig

    return "dp_replicate_size" in inspect.signature(DistributedConfig).parameters


def sharding_config(tensor_parallel_size: int, replicas: int = 1):
    """Transformers' ``DistributedConfig`` for shards over ``tensor_parallel_size`` ranks, copied
    ``replicas`` times over the other ranks (FSDP over groups of one rank: plain copies)."""
    import transformers
    from transformers.distributed import DistributedConfig

    if replicas == 1:
        return DistributedConfig(tp_plan="auto", tp_size=tensor_parallel_size)
    if not shards_can_be_replicated():
        raise ValueError(
            f"tensor x data parallelism ({tensor_parallel_size} x {replicas} ranks) needs Transformers 5.23 or "
            f"later (DistributedConfig's dp_replicate_size); this is {transformers.__version__}"
        )
    return DistributedConfig(tp_plan="auto", tp_size=tensor_parallel_size, dp_replicate_size=replicas)


def tensor_parallel_size(model: torch.nn.Module) -> int:
    group = tensor_parallel_group(model)
    return 1 if group is None else dist.get_world_size(group)


def follows(model: torch.nn.Module) -> bool:
    """Whether this process is a rank of a tensor-parallel model other than its group's first
    (which decides): a server runs `LLMEngine.follow` there."""
    group = tensor_parallel_group(model)
    return group is not None and dist.get_rank(group) != 0


def broadcast_object(obj: Any, group: "dist.ProcessGroup") -> Any:
    """The ``obj`` of ``group``'s first rank, on every rank of ``group`` (the others pass anything)."""
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def schedule_digest(seq_ids: list[int], num_new_tokens: list[int]) -> int:
    """What identifies a step's schedule across processes (hashes of ints are not salted)."""
    return hash((tuple(seq_ids), tuple(num_new_tokens)))


class TensorParallel:
    """One engine's place in its tensor-parallel group; see the module's docstring."""

    def __init__(self, group: "dist.ProcessGroup"):
        self.group = group  # the model's own group (NCCL on CUDA): sampled tokens go over it
        self.rank = dist.get_rank(group)
        self.src = dist.get_global_rank(group, 0)
        ranks = dist.get_process_group_ranks(group)
        self.control = dist.new_group(ranks, backend="gloo", timeout=_CONTROL_TIMEOUT, use_local_synchronization=True)
        self.ops: list[tuple] = []  # rank 0: the requests and aborts since its last step
        self.local: dict[int, Sequence] = {}  # other ranks: their own requests, until matched with rank 0's
        self.digest = 0  # of the last step launched here

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def _broadcast(self, obj: Any) -> Any:
        return broadcast_object(obj, self.control)

    def agree(self, config: EngineConfig, num_pages: int) -> int:
        """At build: raise unless this rank's engine config is rank 0's; return the smallest
        page pool of the ranks (on CUDA each sizes its own from its free memory)."""
        leader_config = self._broadcast(config)
        if leader_config != config:
            raise ValueError(f"hf_cb: rank {self.rank} of the tensor-parallel group has {config}, rank 0 has "
                             f"{leader_config}: every rank needs the same EngineConfig")
        pages = torch.tensor([num_pages])
        dist.all_reduce(pages, op=dist.ReduceOp.MIN, group=self.control)
        return int(pages)

    # -- what the engine tells us --------------------------------------------------------------

    def on_add(self, seq: Sequence) -> None:
        if self.is_leader:
            self.ops.append(("add", seq.seq_id, seq.prompt_ids, seq.params, seq.seed))
        else:
            self.local[seq.seq_id] = seq

    def on_finish(self, seq: Sequence, reason: str, num_generated: int | None) -> None:
        if self.is_leader:
            self.ops.append(("finish", seq.seq_id, reason, num_generated))

    def on_reset(self) -> None:
        """The prefix cache was emptied (weights changed): the other ranks' too, before their next step."""
        if self.is_leader:
            self.ops.append(("reset",))

    def on_launch(self, batch: ScheduledBatch) -> None:
        self.digest = schedule_digest([s.seq_id for s in batch.seqs], batch.num_new_tokens)

    def broadcast_tokens(self, tokens: torch.Tensor) -> None:
        """Rank 0's sampled tokens, in place on every rank."""
        dist.broadcast(tokens, self.src, group=self.group)

    # -- the start of each step ----------------------------------------------------------------

    def sync(self) -> list[tuple]:
        """Rank 0 sends the ops since its last step (and returns none); the other ranks return
        rank 0's ops, for their engine to apply in order (`LLMEngine.step`). Raises `Stopped` on
        the others once rank 0 has called `stop`, and an error if this rank's last step differs
        from rank 0's."""
        if self.is_leader:
            ops, self.ops = self.ops, []
            self._broadcast((ops, self.digest))
            return []
        message = self._broadcast(None)
        if message == _STOP:
            raise Stopped
        ops, digest = message
        if digest != self.digest:
            raise RuntimeError(f"hf_cb: tensor-parallel rank {self.rank} ran a different step than rank 0 "
                               "(did every rank make the same generate calls, with the same weights?)")
        return ops

    def take_local(self, seq_id: int) -> Sequence | None:
        """This rank's own request matching rank 0's ``seq_id`` (None on a follower, which makes
        none of its own)."""
        return self.local.pop(seq_id, None)

    def stop(self) -> None:
        """Rank 0, once its engine is done for good (a server shutting down): the followers'
        `LLMEngine.follow` returns."""
        self._broadcast(_STOP)
