"""Host-side performance measures, apart from the model code: `torch.compile` of the model's
forward, and keeping the cyclic garbage collector off long-lived objects while steps run. (The
decode CUDA graphs are in `cuda_graphs`.)"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Inductor's options for a forward compiled on CUDA. combo_kernels launches independent small
# kernels as one (such as each layer's rotary embedding of q and of k): on llama-1b, W2 20,872 tok/s
# against 20,301 without and W1 42,733 against 42,345, in the same run (H200; docs/performance.md).
CUDA_INDUCTOR_OPTIONS = {"combo_kernels": True}


def compile_forward(model: torch.nn.Module, backend="inductor", fullgraph: bool = False,
                    embed_outside: bool | None = None):
    """``torch.compile`` of the model's own forward, shapes dynamic (the step size varies). The
    attention of each layer is one opaque op (`paged_attention`), so the forward compiles as one
    graph, once: callers keep every step size at 2 or more (sizes 0 and 1 are specialised).
    ``embed_outside`` (default: with Inductor on CUDA): look the tokens up before the compiled
    forward and give it ``inputs_embeds``."""
    import torch.fx.experimental._config as fx_config

    cuda_inductor = backend == "inductor" and next(model.parameters()).is_cuda
    options = dict(CUDA_INDUCTOR_OPTIONS) if cuda_inductor and CUDA_INDUCTOR_OPTIONS else None
    compiled = torch.compile(model, dynamic=True, backend=backend, fullgraph=fullgraph, options=options)
    embed = model.get_input_embeddings() if (cuda_inductor if embed_outside is None else embed_outside) else None

    def forward(*args, **kwargs):
        if embed is not None and "input_ids" in kwargs:
            # The token embedding runs outside the compiled graph. Inside it, Inductor fuses the
            # gather into the first RMSNorm, a reduction it cannot classify, so it times six
            # configurations on the first (worst-case, 16384-token) step and keeps one; several
            # tie there, and one of them took 55.8 us at 32 rows against 4.5 (docs/performance.md). Fed the
            # embeddings, the norm reads a contiguous input and gets one configuration.
            kwargs["inputs_embeds"] = embed(kwargs.pop("input_ids"))
        # Duck sizing gives input dims of equal size one symbol; when one of them is then
        # specialised, so are the others, and a later step recompiles the whole forward.
        # Floats specialised: with dynamic shapes a module's float attribute (nn.Embedding's
        # norm_type) is traced as a symbol that Inductor cannot turn into a tensor, and Dynamo
        # then traces the whole forward a second time (13 of a warm start's 19 s, llama-1b, H200).
        with fx_config.patch(use_duck_shape=False), torch._dynamo.config.patch(specialize_float=True):
            return compiled(*args, **kwargs)

    return forward


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
