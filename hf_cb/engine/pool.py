"""The engine's memory: how many KV pages and recurrent-state slots it holds, and building them
(the page pool, the scheduler and runner around it, the decode CUDA graphs).

A mixin of `LLMEngine`, which owns the state these read (the model, its shape, config and
backend) and calls `_num_pages`, `_build` and `_capture_graphs` at start-up and wake-up.
"""

from __future__ import annotations

import logging
import time

import torch

from hf_cb.attention.backends.flashinfer_backend import FlashInferBackend
from hf_cb.core.config import EngineConfig
from hf_cb.core.scheduler import Scheduler
from hf_cb.core.state_scheduler import StateScheduler
from hf_cb.engine.kv_budget import pages_that_fit, step_peak_bytes, worst_case_step
from hf_cb.engine.state_budget import state_config
from hf_cb.manager import PageManager
from hf_cb.paged_cache import PagedCache
from hf_cb.performance.cuda_graphs import DecodeGraphs
from hf_cb.worker.model_runner import ModelRunner

logger = logging.getLogger("hf_cb")


class EnginePool:
    """Sizing and building an `LLMEngine`'s pages, state slots and graphs (see the module)."""

    def _num_pages(self) -> int:
        """The pool's pages: as configured; on CUDA, what fits beside a worst-case step; else
        the CPU budget less the state pool. A model without attention has pages that only count
        tokens (no memory)."""
        config = self.config
        if config.num_pages is not None:
            num_pages = config.num_pages
        elif self.page_bytes == 0:
            num_pages = config.max_num_seqs * self.max_pages_per_seq
        elif self.device.type == "cuda":
            start = time.perf_counter()
            num_pages = self._profile_num_pages()  # the first forward: with compile, the compilation
            self.startup_s["first_forward"] = time.perf_counter() - start
        else:
            free = config.cpu_kv_cache_bytes - self.state_bytes
            num_pages = max(1, min(config.cpu_max_pages, free // self.page_bytes))
        if self.tp is not None:  # tensor parallel: one config and one pool size on every rank
            num_pages = self.tp.agree(config, num_pages)
        return num_pages

    def _state_config(self, config: EngineConfig) -> EngineConfig:
        """`state_budget.state_config` for this model, on this device."""
        if self.model.device.type == "cuda":
            budget = int(config.memory_utilization * torch.cuda.mem_get_info(self.model.device)[0])
        else:
            budget = config.cpu_kv_cache_bytes
        self.slot_bytes = PagedCache.bytes_per_slot(self.shape.states)
        return state_config(config, self.slot_bytes, budget, has_pages=bool(self.shape.attention),
                            chunked_prefill=self.chunked_prefill, max_model_len=self.max_model_len,
                            model_name=type(self.model).__name__)

    @property
    def state_bytes(self) -> int:
        """Bytes of the recurrent-state pool (0 for a model without recurrent state)."""
        return self.config.max_num_seqs * self.slot_bytes if self.shape.stateful else 0

    def _build(self, num_pages: int) -> None:
        """(Re)create the page pool and everything that holds it."""
        config, shape = self.config, self.shape
        self.cache = PagedCache(shape.layers, num_pages, config.page_size, self.kv_dtype, self.device,
                                layout=self.backend.kv_layout, states=shape.states, num_slots=config.max_num_seqs)
        self.manager = PageManager(num_pages, config.page_size, config.max_num_seqs, self.max_pages_per_seq,
                                   prefix_caching=config.enable_prefix_caching)
        scheduler = StateScheduler if shape.stateful else Scheduler
        self.scheduler = scheduler(config, self.manager, self.stats)
        self.runner = ModelRunner(
            self.model, self.forward, self.cache, self.manager, self.backend,
            max_num_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs, tp=self.tp,
            shape=shape,
        )

    def _profile_num_pages(self) -> int:
        """Run a worst-case step on a throwaway pool; the pages that fit beside its peak (`kv_budget`)."""
        case = worst_case_step(self.config, self.max_model_len)
        self._build(case.num_pages)
        for seq in case.batch.seqs:
            self.manager.allocate(seq.seq_id, case.tokens_per_row)
        peak = step_peak_bytes(self.device, lambda: self.runner.run(case.batch))
        self.drop_pool()
        return pages_that_fit(self.device, peak, self.config, self.page_bytes, self.max_model_len, self.state_bytes)

    def drop_pool(self) -> None:
        """Drop what `_build` built (the engine is then `asleep` until the next `_build`)."""
        self.cache = self.manager = self.scheduler = self.runner = None

    def _replays_graphs(self) -> bool:
        """Whether decode steps replay from CUDA graphs: asked for, on FlashInfer, and not under
        tensor parallelism (capturing the all-reduces of Transformers' TP layers, NCCL from Python
        hooks, beside eager steps on the same communicator is not verified)."""
        return self.config.cuda_graphs and isinstance(self.backend, FlashInferBackend) and self.tp is None

    def _capture_graphs(self) -> None:
        """Capture the decode graphs, if the config asks for them and the backend has them."""
        if not self._replays_graphs():
            if self.config.cuda_graphs and self.tp is not None:
                logger.info("hf_cb: no decode CUDA graphs under tensor parallelism (collectives inside graphs "
                            "are not supported by hf_cb yet); every step runs eager")
            return
        self.runner.graphs = None  # a recapture frees the old graphs' memory first
        start = time.perf_counter()
        graphs = DecodeGraphs(
            self.model, self.forward, self.cache, self.backend, self.config.max_num_seqs, self.max_num_page_ids,
            self.max_pages_per_seq,
        )
        graphs.capture()
        self.runner.graphs = graphs
        self.startup_s["graph_capture"] = time.perf_counter() - start
        logger.info("hf_cb: captured %d decode graphs in %.1f s", len(graphs.sizes), self.startup_s["graph_capture"])

