"""The FlashInfer attention backend (CUDA, fp16/bf16).

Steps with any multi-token row run `BatchPrefillWithPagedKVCacheWrapper` (causal); pure decode
steps run `BatchDecodeWithPagedKVCacheWrapper`. Each distinct kind of layer (sliding window,
soft-cap, softmax scale) gets its own pair of wrappers, planned once per step from int32 index
arrays staged in pinned host buffers, so `plan()` never reads device memory. New K/V go into the
pages with one `append_paged_kv_cache` launch per layer.
"""

from __future__ import annotations

import numpy as np
import torch

from .manager import PageTable
from .staging import Staging

WORKSPACE_BYTES = 128 << 20
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)

Kind = tuple  # (sliding_window, softcap, scaling)


def unsupported_reason(dtype: torch.dtype, head_dim: int) -> str | None:
    """Why FlashInfer cannot serve this model, or None."""
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return "FlashInfer is not installed (pip install 'hf_cb[flashinfer]')"
    if dtype not in SUPPORTED_DTYPES:
        return f"FlashInfer has no {dtype} attention kernels (fp16 and bf16 only)"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"FlashInfer has no kernels for head_dim {head_dim} (64, 128 and 256 only)"
    return None


def plan_options(backend: "FlashInferBackend", kind: Kind) -> dict:
    """The `plan()` keywords for one kind of layer (shared by eager and graph wrappers)."""
    sliding_window, softcap, scaling = kind
    return dict(
        window_left=-1 if sliding_window is None else sliding_window - 1,
        logits_soft_cap=softcap,
        sm_scale=scaling,
        q_data_type=backend.dtype,
        kv_data_type=backend.dtype,
        non_blocking=True,
    )


class FlashInferBackend:
    def __init__(
        self,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_num_seqs: int,
        max_num_tokens: int,
        max_num_page_ids: int,
        prefill_backend: str = "auto",
        decode_tensor_cores: bool | None = None,
    ):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.page_size, self.dtype, self.device = page_size, dtype, device
        # fa3 measured faster than fa2 on Hopper; its prebuilt kernels are bf16 only.
        if prefill_backend == "auto":
            fa3_ok = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] == 9
            prefill_backend = "fa3" if fa3_ok else "fa2"
        self.prefill_backend = prefill_backend
        # Tensor-core decode (FlashInfer's prefill kernels) measured faster for GQA groups of 2
        # and 4 on an H200 (benchmarks/attention_kernels.py; README).
        if decode_tensor_cores is None:
            decode_tensor_cores = num_heads // num_kv_heads >= 2
        self.use_tensor_cores = decode_tensor_cores
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        i32 = torch.int32
        self.staging = Staging(
            device,
            {
                "qo_indptr": (max_num_seqs + 1, i32),
                "kv_indptr": (max_num_seqs + 1, i32),
                "kv_indices": (max_num_page_ids, i32),
                "kv_last_page_len": (max_num_seqs, i32),
                "token_rows": (max_num_tokens, i32),
                "positions": (max_num_tokens, i32),
            },
        )
        self.new_kinds = False  # set when a step met a kind of layer no earlier plan() covered
        self._prefill: dict[Kind, object] = {}
        self._decode: dict[Kind, object] = {}

    def plan(self, table: PageTable) -> "FlashInferStep":
        arrays = {
            "qo_indptr": table.qo_indptr,
            "kv_indptr": table.kv_indptr,
            "kv_indices": table.kv_indices,
            "kv_last_page_len": table.kv_last_page_len,
            "token_rows": table.token_rows,
            "positions": table.positions.astype(np.int32),
        }
        staged = {name: self.staging.put(name, a) for name, a in arrays.items()}
        step = FlashInferStep(
            self,
            is_decode=bool((np.diff(table.qo_indptr) == 1).all()),
            host={name: pair[0] for name, pair in staged.items()},
            dev={name: pair[1] for name, pair in staged.items()},
        )
        for kind in self._wrappers(step.is_decode):
            step.wrapper(kind)
        return step

    def _wrappers(self, is_decode: bool) -> dict:
        return self._decode if is_decode else self._prefill

    def new_wrapper(self, is_decode: bool):
        import flashinfer

        if is_decode:
            return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores
            )
        return flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend=self.prefill_backend)


class FlashInferStep:
    """One planned step. A kind of layer not seen before is planned on first use (and from
    then on at every `plan`)."""

    def __init__(self, backend: FlashInferBackend, *, is_decode: bool, host: dict, dev: dict):
        self.backend = backend
        self.is_decode = is_decode
        self.host, self.dev = host, dev  # int32 index arrays: pinned host copies, device copies
        self._planned: dict[Kind, object] = {}

    def wrapper(self, kind: Kind):
        wrapper = self._planned.get(kind)
        if wrapper is not None:
            return wrapper
        b, h, d = self.backend, self.host, self.dev
        wrappers = b._wrappers(self.is_decode)
        if kind not in wrappers:
            wrappers[kind] = b.new_wrapper(self.is_decode)
            b.new_kinds = True
        wrapper = wrappers[kind]
        options = plan_options(b, kind)
        shape = (b.num_heads, b.num_kv_heads, b.head_dim, b.page_size)
        # indptr and last-page lengths are read on the host; page ids only on the device.
        if self.is_decode:
            wrapper.plan(h["kv_indptr"], d["kv_indices"], h["kv_last_page_len"], *shape, **options)
        else:
            wrapper.plan(
                h["qo_indptr"], h["kv_indptr"], d["kv_indices"], h["kv_last_page_len"], *shape,
                causal=True, **options,
            )
        self._planned[kind] = wrapper
        return wrapper

    @torch.compiler.disable  # compiled forwards call FlashInfer as it is
    def write_kv(self, k_cache, v_cache, key, value) -> None:
        import flashinfer

        d = self.dev
        flashinfer.append_paged_kv_cache(
            key, value, d["token_rows"], d["positions"], (k_cache, v_cache),
            d["kv_indices"], d["kv_indptr"], d["kv_last_page_len"],
        )

    @torch.compiler.disable
    def attend(self, query, k_cache, v_cache, *, scaling, sliding_window, softcap) -> torch.Tensor:
        wrapper = self.wrapper((sliding_window, softcap, scaling))
        return wrapper.run(query.contiguous(), (k_cache, v_cache))
