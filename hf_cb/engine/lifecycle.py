"""What an engine does about memory it can rebuild and weights that change under it: the prefix
cache's counters and reset, `sync_weights` after a training step, `sleep` / `wake_up` around one.

A mixin of `LLMEngine`, which owns the state these read (the model, its pool, scheduler and runner,
the fused projections, the weights' last state) and builds the pool and the graphs again
(`_build`, `_capture_graphs`).
"""

from __future__ import annotations

import gc
import logging

import torch

from hf_cb.engine.weights import weights_state

logger = logging.getLogger("hf_cb")


class EngineLifecycle:
    """The prefix cache, weight changes and sleep of an `LLMEngine` (see the module)."""

    def prefix_cache_stats(self) -> tuple[int, int]:
        """(prompt tokens looked up in the prefix cache, of them found there), since start."""
        return self.stats.prefix_queries, self.stats.prefix_hits

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (sequences running keep their pages)."""
        if not self.asleep:
            self.manager.reset_prefix_cache()
        if self.tp is not None:  # tensor parallel: rank 0 sends it at the next step
            self.tp.on_reset()

    def sync_weights(self) -> None:
        """Call before running new requests: if the weights were written since the last call
        (an optimizer step, `load_state_dict`), cached prefixes computed with the old ones are
        forgotten; if parameters were replaced by new tensors, the CUDA graphs (which hold their
        addresses) are captured again."""
        state = weights_state(self.model)
        if state == self._weights:
            return
        moved = state[0] != self._weights[0]
        if moved:
            for group in self.fused:
                if not group.is_fused():  # a parameter was replaced: fuse the new ones
                    group.fuse()
            state = weights_state(self.model)
        self._weights = state
        self.reset_prefix_cache()
        if moved and not self.asleep and self.runner.graphs is not None:
            logger.info("hf_cb: the model's parameters were replaced; capturing the decode graphs again")
            self._capture_graphs()

    @property
    def asleep(self) -> bool:
        return self.cache is None

    def sleep(self) -> None:
        """Free the page pool and the decode graphs (the memory the engine can rebuild), for a
        trainer to use; `wake_up` (or the next request) rebuilds them."""
        if self.asleep:
            return
        if self.owner is not None or self.has_unfinished():
            raise RuntimeError("hf_cb: an engine with requests running (or an OnlineEngine stepping it) cannot sleep")
        self.drop_pool()
        gc.collect()  # the engine's parts refer to each other: free the pages now
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        """Rebuild what `sleep` freed: as many pages as before, and the decode graphs."""
        if not self.asleep:
            return
        self._build(self.num_pages)
        self._capture_graphs()
