"""Noticing that a model's weights changed between engine runs (an optimizer step, a
`load_state_dict`), so that nothing computed with the old ones is reused."""

from __future__ import annotations

import torch


def weights_state(model: torch.nn.Module) -> tuple[tuple[int, ...], int]:
    """(the address of every parameter and buffer, the sum of their version counters).

    In-place writes (optimizers, `load_state_dict`, ``with torch.no_grad(): p.copy_(...)``)
    bump a tensor's version counter; replacing a parameter changes its address. Writes through
    ``p.data`` bump neither: after those, call `hf_cb.reset_prefix_cache`.
    """
    tensors = [_local(t) for t in (*model.parameters(), *model.buffers())]
    return tuple(t.data_ptr() for t in tensors), sum(t._version for t in tensors)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor-parallel shard's own tensor: a DTensor's ``data_ptr`` is not its storage's."""
    to_local = getattr(tensor, "to_local", None)  # a DTensor
    return to_local() if to_local is not None else tensor
