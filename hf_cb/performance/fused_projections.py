"""Fused input projections for engine steps: q/k/v, and gate/up, each one GEMM.

A decode step of a few dozen rows reads the weights, and a small GEMM is bound by its latency,
not by bandwidth (H200, llama-1b at 32 rows: `k_proj` and `v_proj`, 2 MB each, took 5.4 us
apiece, about 0.4 TB/s). So the projections that read one input are fused: their weights move
into one tensor, and each module's parameter becomes a view of its rows (the same `Parameter`
object, its ``.data`` re-pointed), so optimizers, `state_dict` and `load_state_dict` see the
parameters they saw before, and in-place updates land in the fused tensor. Inside an engine step
the first module of a group that is called runs the one GEMM and the others take their slices
of it; everywhere else (training, plain forwards) each module runs its own forward.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from hf_cb.attention.context import in_step

logger = logging.getLogger("hf_cb")

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedGroup:
    """Linear modules that read one input, computed as one GEMM inside engine steps."""

    def __init__(self, modules: list[nn.Linear]):
        self.modules = modules
        self.sizes = [m.out_features for m in modules]
        self.weight = self.bias = None
        self.source: torch.Tensor | None = None  # the input of the outputs in `pending`
        self.pending: dict[int, torch.Tensor] = {}
        self.fuse()
        for i, module in enumerate(modules):
            module.forward = _fused_forward(self, i, module)

    def fuse(self) -> None:
        """Move the modules' weights (and biases) into one tensor each; their parameters become
        views of it."""
        self.weight = _concat_into_views([m.weight for m in self.modules])
        if self.modules[0].bias is not None:
            self.bias = _concat_into_views([m.bias for m in self.modules])

    def is_fused(self) -> bool:
        """Whether every parameter is still a view of the fused tensors (not replaced since)."""
        return _views_of(self.weight, [m.weight for m in self.modules]) and (
            self.bias is None or _views_of(self.bias, [m.bias for m in self.modules])
        )

    def unfuse(self) -> None:
        """Give each module its own forward back (its parameter stays a view)."""
        for module in self.modules:
            del module.forward
        self.pending.clear()
        self.source = None

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.source is x and i in self.pending:
            out = self.pending.pop(i)
            if not self.pending:
                self.source = None
            return out
        outs = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        self.pending = {j: o for j, o in enumerate(outs) if j != i}
        self.source = x
        return outs[i]


def _fused_forward(group: FusedGroup, i: int, module: nn.Linear):
    linear = type(module).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        # Under autograd each parameter must get its own gradient: the module's own forward.
        if torch.is_grad_enabled() or not in_step():
            return linear(module, x)
        return group.output(i, x)

    return forward


def _concat_into_views(params: list[nn.Parameter]) -> torch.Tensor:
    fused = torch.cat([p.detach() for p in params])
    start = 0
    for p in params:
        p.data = fused[start : start + p.shape[0]]
        start += p.shape[0]
    return fused


def _views_of(fused: torch.Tensor, params: list[nn.Parameter]) -> bool:
    start, step = fused.data_ptr(), fused.element_size()
    for p in params:
        if p.data_ptr() != start or p.device != fused.device or p.dtype != fused.dtype:
            return False
        start += p.numel() * step
    return True


def fuse_projections(model: nn.Module) -> list[FusedGroup]:
    """Fuse every group of `GROUPS` the model has: plain `nn.Linear` children of one module
    with one input size, dtype and device, all with or all without a bias."""
    groups = []
    for parent in model.modules():
        for names in GROUPS:
            modules = [getattr(parent, n, None) for n in names]
            if _fusable(modules):
                groups.append(FusedGroup(modules))
    if groups:
        logger.info("hf_cb: fused %d groups of input projections", len(groups))
    return groups


def _fusable(modules: list) -> bool:
    if not all(type(m) is nn.Linear for m in modules):  # subclasses (LoRA, quantised) are left alone
        return False
    first = modules[0].weight
    return all(
        m.in_features == modules[0].in_features and m.weight.dtype == first.dtype
        and m.weight.device == first.device and (m.bias is None) == (modules[0].bias is None)
        and "forward" not in vars(m)
        for m in modules
    )
