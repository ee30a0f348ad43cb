"""Host-side performance measures, apart from the model code: `torch.compile` of the model's
forward, and keeping the cyclic garbage collector off long-lived objects while steps run. (The
decode CUDA graphs are in `cuda_graphs`.)"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def compile_forward(model: torch.nn.Module, num_layers: int):
    """``torch.compile`` of the model's own forward, shapes dynamic (the step size varies)."""
    import torch._dynamo

    # Each layer's attention module is a separate specialisation (its layer_idx is static).
    limit = max(torch._dynamo.config.recompile_limit, 4 * num_layers)
    torch._dynamo.config.recompile_limit = limit
    return torch.compile(model, dynamic=True)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave every object alive when a run starts out of the cyclic garbage collector's walks
    until it ends. Compilation and graph capture leave millions of long-lived objects, and a
    full collection over them in the middle of a run stalls the host (vLLM freezes its heap
    for the same reason). Unfrozen after the run: garbage among them (a training step's, say)
    is still collected."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
