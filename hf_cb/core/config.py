"""The one engine configuration dataclass."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

# vLLM's threshold for its larger defaults (H100- and H200-class GPUs): `default_max_num_seqs`.
LARGE_GPU_BYTES = 70 << 30


@dataclass(frozen=True)
class EngineConfig:
    """How the continuous-batching engine is sized and run.

    Attributes:
        page_size: tokens per KV page. 64 beat 16 by 1-4 % on W1, W2, W3 and qwen3-0.6b's W1
            (H200, docs/performance.md). Prefix caching reuses whole pages, so a prompt shares at most its
            longest multiple of ``page_size`` tokens; each sequence's last page is part empty.
        num_pages: pages in the pool. ``None``: on CUDA, sized from the memory free after a
            worst-case step (see ``memory_utilization``); elsewhere ``cpu_kv_cache_bytes`` worth,
            at most ``cpu_max_pages``.
        max_num_seqs: most requests in one step (and the largest decode CUDA graph). ``None``:
            as vLLM, 1024 on a CUDA device of at least 70 GiB, 256 elsewhere
            (`default_max_num_seqs`). Batches of many requests gain from 1024 (on an H200: W3 on
            llama-1b +5 %, W4 on llama-8b 22.2k against 16.9k tok/s); the cost is four times as
            many decode graphs to capture (about 1 s more at start-up). See docs/performance.md.
        max_num_batched_tokens: most tokens (prefill chunks plus decode rows) in one step;
            longer prompts are prefilled in chunks of at most this many tokens. 16384 beat
            8192 on W3 (benchmarks/sweep.py; docs/performance.md), as in vLLM's offline default.
        memory_utilization: on CUDA, the share of the memory left after the worst-case step
            that goes to KV pages.
        max_model_len: longest prompt plus output; ``None`` takes the model's
            ``max_position_embeddings``.
        attention_backend: ``"auto"`` picks FlashInfer on CUDA when it is installed and supports
            the dtype and head size, the PyTorch backend otherwise.
        prefill_backend: FlashInfer prefill kernels: ``"fa3"`` (faster on Hopper, bf16),
            ``"fa2"``, or ``"auto"`` (fa3 for bf16 on Hopper, else fa2).
        decode_tensor_cores: FlashInfer decode on tensor cores (its prefill kernels); None
            decides by the GQA group size.
        decode_split_kv: whether a decode CUDA graph on tensor cores may split a row's KV
            over several CTAs (then merged by a second kernel). ``None``: only in graphs whose
            rows leave SMs without work (`flashinfer_backend.graph_split_kv`).
        kv_layout: how a KV page is laid out: ``"NHD"`` ([tokens, heads, dim]) or ``"HND"``
            ([heads, tokens, dim], FlashInfer only). ``"auto"``: HND on FlashInfer, which reads
            it faster at 64-token pages (W1 on llama-1b +3 %, qwen3-0.6b +2 %; docs/performance.md), NHD on
            the PyTorch backend.
        kv_cache_dtype: how the KV pages store keys and values: ``"auto"`` in the model's dtype;
            ``"fp8"`` (or ``"fp8_e4m3"``) as float8 e4m3 with a scale of 1 (values clamped to
            +-448), vLLM's ``kv_cache_dtype="fp8"`` without calibrated scales. Opt-in because it
            changes the numbers: every key and value keeps 3 mantissa bits. Halves the KV
            memory, so twice the tokens fit, and on Hopper decode reads the pages with
            TensorRT-LLM's XQA kernel (`xqa_decode`), which also computes in fp8: W1 on
            llama-1b 50.6k tok/s against 42.8k in the same run, qwen3-0.6b 33.1k (H200, docs/performance.md).
            FlashInfer compiles XQA and its fa2 prefill for fp8 pages on first use.
        cuda_graphs: replay decode steps from CUDA graphs (CUDA with FlashInfer only).
        compile: ``torch.compile`` the model's forward, as one graph (each layer's attention is
            one opaque op); pays off with CUDA graphs, where it fuses the small kernels (W1 on
            llama-1b: 41k tok/s against 29k); on CUDA with Inductor's combo kernels
            (`performance.compile.CUDA_INDUCTOR_OPTIONS`). ``None``: on wherever decode steps replay from CUDA
            graphs, off elsewhere. A compiled llama-1b engine starts in 14 s from a warm compile
            cache and in 41 s from a cold one (H200; docs/performance.md).
        fuse_projections: inside engine steps, compute q/k/v and gate/up (Llama's naming) as
            one GEMM each (`fused_projections`): W2 on an H200 +12 %, where small decode GEMMs
            are latency-bound. Opt-in because users can see it: the parameters become views of
            one tensor each, which `save_pretrained` and safetensors 0.8 save correctly, but
            Accelerate's safetensors saving (`clean_state_dict_for_safetensors`) treats them as
            tied and keeps only one of each group.
        async_scheduling: prepare step n+1 while the device runs step n; an EOS is then seen
            one step late (the extra token is dropped). Off for requests with a repetition
            penalty, which needs every token on the host.
        enable_prefix_caching: reuse the KV pages of prompt prefixes computed before (shared
            system prompts, few-shot examples, the ``n`` samples of one prompt). Cached pages
            are freed only when their memory is needed.
        cpu_kv_cache_bytes / cpu_max_pages: the bounded default pool off CUDA.
    """

    page_size: int = 64
    num_pages: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int = 16384
    memory_utilization: float = 0.9
    max_model_len: int | None = None
    attention_backend: Literal["auto", "flashinfer", "torch"] = "auto"
    prefill_backend: Literal["auto", "fa2", "fa3"] = "auto"
    decode_tensor_cores: bool | None = None
    decode_split_kv: bool | None = None
    kv_layout: Literal["auto", "NHD", "HND"] = "auto"
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = "auto"
    cuda_graphs: bool = True
    compile: bool | None = None
    fuse_projections: bool = False
    async_scheduling: bool = True
    enable_prefix_caching: bool = True
    cpu_kv_cache_bytes: int = 2 << 30
    cpu_max_pages: int = 4096

    def __post_init__(self) -> None:
        positive = ("page_size", "max_num_seqs", "max_num_batched_tokens")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"EngineConfig.num_pages must be >= 1 or None, got {self.num_pages}")
        if not 0.0 < self.memory_utilization <= 1.0:
            raise ValueError(
                f"EngineConfig.memory_utilization must be in (0, 1], got {self.memory_utilization}"
            )
        if self.attention_backend not in ("auto", "flashinfer", "torch"):
            raise ValueError(f"unknown EngineConfig.attention_backend {self.attention_backend!r}")
        if self.kv_layout not in ("auto", "NHD", "HND"):
            raise ValueError(f"unknown EngineConfig.kv_layout {self.kv_layout!r} (auto, NHD or HND)")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            raise ValueError(f"unknown EngineConfig.kv_cache_dtype {self.kv_cache_dtype!r} (auto, fp8 or fp8_e4m3)")
        if self.prefill_backend not in ("auto", "fa2", "fa3"):
            raise ValueError(f"unknown EngineConfig.prefill_backend {self.prefill_backend!r}")

    def resolved(self, device: torch.device) -> EngineConfig:
        """This config with what ``None`` leaves to the device filled in (``max_num_seqs``)."""
        if self.max_num_seqs is not None:
            return self
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
        return replace(self, max_num_seqs=default_max_num_seqs(device.type, total))


def default_max_num_seqs(device_type: str, total_memory: int) -> int:
    """vLLM's default: 1024 rows a step on a GPU of at least 70 GiB, 256 elsewhere."""
    return 1024 if device_type == "cuda" and total_memory >= LARGE_GPU_BYTES else 256
