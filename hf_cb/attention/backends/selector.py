"""Which attention backend serves a model: FlashInfer on CUDA where it can, PyTorch elsewhere."""

from __future__ import annotations

import warnings

import torch

from hf_cb.attention.backends.flashinfer_backend import FlashInferBackend
from hf_cb.attention.backends.flashinfer_backend import unsupported_reason as flashinfer_unsupported_reason
from hf_cb.attention.backends.torch_backend import TorchAttentionBackend
from hf_cb.attention.backends.xqa_decode import unsupported_reason as xqa_unsupported_reason
from hf_cb.attention.shape import AttentionShape
from hf_cb.core.config import EngineConfig
from hf_cb.paged_cache import FP8


def make_backend(config: EngineConfig, shape: AttentionShape, dtype: torch.dtype, device: torch.device,
                 max_num_page_ids: int, kv_dtype: torch.dtype | None = None, max_pages_per_seq: int | None = None):
    """FlashInfer on CUDA where it can serve the model, the PyTorch backend otherwise. ``kv_dtype``:
    the pages' (default ``dtype``); fp8 pages on FlashInfer are read by XQA, whose limits are
    checked here, before any GPU work."""
    if config.attention_backend == "torch":
        return torch_backend(config, device)
    if device.type != "cuda":
        if config.attention_backend == "flashinfer":
            raise ValueError(f"the FlashInfer backend needs a CUDA model, this one is on {device}")
        return torch_backend(config, device)
    reason = shape.flashinfer_unsupported() or flashinfer_unsupported_reason(dtype, shape.head_dim)
    if not reason and kv_dtype == FP8:
        reason = xqa_unsupported_reason(shape.head_dim, config.page_size, shape.logit_softcap,
                                        torch.cuda.get_device_capability(device))
        if reason:  # not a silent fall back to the slow backend: fp8 pages were asked for speed
            raise ValueError(f"{reason}; attention_backend='torch' reads fp8 pages anywhere, slowly")
    if reason:
        if config.attention_backend == "flashinfer":
            raise ValueError(reason)
        warnings.warn(f"hf_cb: using the PyTorch attention backend on CUDA: {reason}", stacklevel=3)
        return torch_backend(config, device)
    return FlashInferBackend(
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        page_size=config.page_size,
        dtype=dtype,
        device=device,
        max_num_seqs=config.max_num_seqs,
        max_num_tokens=config.max_num_batched_tokens,
        max_num_page_ids=max_num_page_ids,
        prefill_backend=config.prefill_backend,
        decode_tensor_cores=config.decode_tensor_cores,
        decode_split_kv=config.decode_split_kv,
        kv_layout="HND" if config.kv_layout == "auto" else config.kv_layout,
        kv_dtype=kv_dtype,
        max_pages_per_seq=max_pages_per_seq,
    )


def torch_backend(config: EngineConfig, device: torch.device) -> TorchAttentionBackend:
    if config.kv_layout not in ("auto", TorchAttentionBackend.kv_layout):
        raise ValueError(f"EngineConfig.kv_layout={config.kv_layout!r} needs the FlashInfer backend; the PyTorch "
                         f"backend keeps its pages {TorchAttentionBackend.kv_layout}")
    return TorchAttentionBackend(config.page_size, device)
