"""Host-to-device staging of each step's small index arrays.

On CUDA every array goes through a pinned host buffer, reused from step to step, and an async
copy into a device buffer; the caller must not rewrite a buffer before the copy out of it has
run (the model runner waits on an event recorded after each step's copies). Elsewhere the numpy
array is used as it is.
"""

from __future__ import annotations

import numpy as np
import torch


class Staging:
    def __init__(self, device: torch.device, sizes: dict[str, tuple[int, torch.dtype]],
                 into: dict[str, torch.Tensor] | None = None):
        """``sizes``: each array's most entries and dtype. ``into``: device tensors that some
        arrays are copied straight into (a CUDA graph's fixed inputs), instead of new buffers."""
        into = into or {}
        self.on_cuda = device.type == "cuda"
        self.host: dict[str, torch.Tensor] = {}
        self.device: dict[str, torch.Tensor] = {}
        if self.on_cuda:
            for name, (n, dtype) in sizes.items():
                self.host[name] = torch.zeros(n, dtype=dtype, pin_memory=True)
                # One spare entry: a full step's view is then never its whole buffer, a case
                # torch.compile would specialise on (and recompile for every other size).
                self.device[name] = into[name] if name in into else torch.zeros(n + 1, dtype=dtype, device=device)
        self.dtypes = {name: dtype for name, (_, dtype) in sizes.items()}

    def put(self, name: str, array: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(host, device) tensors holding ``array``, the device copy enqueued asynchronously."""
        if not self.on_cuda:
            t = torch.from_numpy(np.ascontiguousarray(array)).to(self.dtypes[name])
            return t, t
        n = len(array)
        if n > len(self.host[name]):
            raise ValueError(f"staging buffer {name!r} holds {len(self.host[name])} entries, got {n}")
        host = self.host[name][:n]
        host.numpy()[:] = array
        dev = self.device[name][:n]
        dev.copy_(host, non_blocking=True)
        return host, dev
