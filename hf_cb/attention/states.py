"""Per-sequence recurrent state: a slot pool for each linear-attention, state-space or
convolution layer, served to the model through Transformers' own linear-attention cache layer.

A layer's states live in pools of ``[num_slots, ...]``, one slot per running sequence (the
sequence's row of the page manager's block table). Around each step's forward, `StateLayer.bind`
gathers the step's rows into the ``conv_states`` / ``recurrent_states`` that Transformers'
`LinearAttentionLayer` serves to the model (``get_conv_state``, ``update_conv_state``,
``get_recurrent_state``...), and `unbind` scatters them back: the model's own code, and the
cache layer's own update rules, run unchanged on a batch of the step's sequences.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import LinearAttentionLayer

from hf_cb.attention.shape import StateSpec


class StateLayer(LinearAttentionLayer):
    """One layer's recurrent states for every slot; between `bind` and `unbind`, those of one
    step's sequences, as Transformers' `LinearAttentionLayer` holds a batch's."""

    def __init__(self, spec: StateSpec, num_slots: int, device: torch.device):
        LinearAttentionLayer.__init__(self, number_of_states=len(spec.conv))
        self.state_spec = spec
        conv_dtype, recurrent_dtype = getattr(torch, spec.conv_dtype), getattr(torch, spec.recurrent_dtype)
        self.dtype, self.device = conv_dtype, device
        self.conv_pool = {i: torch.zeros((num_slots, *s), dtype=conv_dtype, device=device)
                          for i, s in enumerate(spec.conv) if s is not None}
        self.recurrent_pool = {i: torch.zeros((num_slots, *s), dtype=recurrent_dtype, device=device)
                               for i, s in enumerate(spec.recurrent) if s is not None}
        for i, s in enumerate(spec.conv):
            self.conv_kernel_size[i] = s[-1] if s is not None else None

    def lazy_initialization(self, *args, **kwargs) -> None:
        # The pools are allocated up front; a state the recording forward did not show is a bug.
        raise RuntimeError("hf_cb's state layers are bound to a step's slots before the forward (StateLayer.bind)")

    def bind(self, slots: torch.Tensor, fresh: bool) -> None:
        """Serve the states of ``slots`` (the step's rows, in order) to the forward. ``fresh``:
        the sequences start here (no previous state; the model initialises it, as on a first
        prefill)."""
        for pools, states, flags in ((self.conv_pool, self.conv_states, self.is_conv_states_initialized),
                                     (self.recurrent_pool, self.recurrent_states, self.is_recurrent_states_initialized)):
            for i, pool in pools.items():
                states[i] = pool.new_zeros((len(slots), *pool.shape[1:])) if fresh else pool.index_select(0, slots)
                flags[i] = True
        for i in range(self.number_of_states):
            self.has_previous_state[i] = not fresh

    def unbind(self, slots: torch.Tensor | None) -> None:
        """Write the step's states back to ``slots`` (None: drop them, as after a failed step)."""
        for pools, states, flags in ((self.conv_pool, self.conv_states, self.is_conv_states_initialized),
                                     (self.recurrent_pool, self.recurrent_states, self.is_recurrent_states_initialized)):
            for i, pool in pools.items():
                if slots is not None:
                    pool.index_copy_(0, slots, states[i].to(pool.dtype))
                states[i], flags[i] = None, False

    def copy_slot(self, src: int, dst: int) -> None:
        """Give slot ``dst`` the states of slot ``src`` (the ``n`` samples of one prompt)."""
        for pool in (*self.conv_pool.values(), *self.recurrent_pool.values()):
            pool[dst].copy_(pool[src])

    def increase_count(self, state_idx: int) -> None:
        """Sequence lengths live in the page manager."""

    def reset(self) -> None:
        """The slots belong to the engine's sequences; a reset leaves them."""
