"""Which models hf_cb can serve, and the shape of their attention.

A model is judged by what it does, not by the flags its class sets: `probe_attention` runs one
tiny packed step through hf_cb's attention and checks that every attention layer attended (and
so wrote its K/V) once through the ``"hf_cb"`` function, and that the logits equal the model's
own forward.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.hooks import RemovableHandle
from transformers import DynamicCache

from .attention_interface import ATTENTION_NAME, STEP_KWARG, AttentionStep, register
from .manager import PageManager
from .paged_attention import in_step
from .paged_cache import PagedCache
from .step_forward import cache_keyword, forward_step
from .tensor_parallel import tensor_parallel_size
from .torch_backend import TorchAttentionBackend

_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}
_CACHE_NAMES = ("cache", "past_key_values")  # Transformers 5.24 renamed the keyword
# Two sequences packed in one row, as the engine packs a step; page size 4 so each spans pages.
_PROBE_LENGTHS = (3, 5)
_PROBE_PAGE_SIZE = 4
# Per token, |logits - own forward's| over the spread of the own forward's. Measured on random
# models: hf_cb and the model's own kernels differ by 0 in float32 (CPU and H200), up to 0.018
# in bf16 (12 layers, H200); positions taken from the wrong place give 0.05 (12 layers, small
# weights) to 0.3-1 (the tests' models). Only gross errors are refused in half precision.
_MAX_LOGIT_ERROR = {torch.float32: 0.01, torch.float64: 0.01}
_MAX_LOGIT_ERROR_HALF = 0.1


class ModelNotSupported(ValueError):
    """The model cannot run on hf_cb; the message says why."""


def layer_windows(model: torch.nn.Module) -> list[int | None]:
    """Each layer's sliding window (None: full attention). Refuses layers hf_cb cannot serve."""
    config = model.config.get_text_config(decoder=True)
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ModelNotSupported(f"{name} is an encoder-decoder model; hf_cb serves decoder-only LMs")
    layer_types = getattr(config, "layer_types", None) or []
    unsupported = sorted(set(layer_types) - _ATTENTION_LAYER_TYPES)
    if unsupported:
        raise ModelNotSupported(
            f"{name} has layers of type {unsupported}, which do not attend through the attention "
            "interface; hf_cb serves full and sliding-window attention layers"
        )
    if any(hasattr(m, "sinks") for m in model.modules()):
        raise ModelNotSupported(f"{name} uses attention sinks, which hf_cb does not support")
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if not layer_types:
        return [window] * num_layers
    return [window if t == "sliding_attention" else None for t in layer_types[:num_layers]]


@dataclass(frozen=True)
class AttentionShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    logit_softcap: float | None = None  # Gemma 2's attention logit soft-cap


def attention_shape(model: torch.nn.Module) -> AttentionShape:
    """The attention of this process's model: under tensor parallelism, of its shard."""
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_attention_heads", None)
    if not heads:  # RWKV, xLSTM...: no attention at all
        raise ModelNotSupported(f"{type(model).__name__}'s config names no attention heads; hf_cb serves attention LMs")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tp_size = tensor_parallel_size(model)
    if tp_size > 1:
        heads, kv_heads = _shard_heads(model, heads, kv_heads, tp_size)
    return AttentionShape(
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        logit_softcap=getattr(config, "attn_logit_softcapping", None),
    )


def _shard_heads(model: torch.nn.Module, heads: int, kv_heads: int, tp_size: int) -> tuple[int, int]:
    """This rank's (query heads, K/V heads) of a tensor-parallel model. The config keeps the
    model's global numbers, so the K/V heads are counted on what the shard's own forward writes
    to a cache; the query heads keep the model's group size (Transformers' plans split q, k and
    v alike)."""
    name = type(model).__name__
    if kv_heads % tp_size or heads % tp_size:
        raise ModelNotSupported(
            f"{name} has {heads} query and {kv_heads} K/V heads, which {tp_size} tensor-parallel ranks cannot "
            f"split into whole heads; hf_cb does not replicate K/V heads: use a tensor-parallel size that "
            f"divides {math.gcd(heads, kv_heads)}"
        )
    cache = DynamicCache()
    ids = torch.ones(1, 1, dtype=torch.long, device=model.device)
    with torch.no_grad(), _eval_mode(model):
        model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
    written = {layer.keys.shape[1] for layer in cache.layers}
    if len(written) != 1:
        raise ModelNotSupported(f"{name}'s layers hold different numbers of K/V heads on a rank: {sorted(written)}")
    local = written.pop()
    return heads * local // kv_heads, local


# -- the probe -----------------------------------------------------------------------------


class RecordingStep:
    """A backend step that counts, per cache layer, the calls of `paged_attention`: each writes
    the layer's K/V (`write_kv`), then attends over its pages (`attend`), so counting the
    attends counts both. Layers are told apart by their page tensors, which `paged_attention`
    takes by the attention module's ``layer_idx``."""

    def __init__(self, step: AttentionStep, cache: PagedCache):
        self.step = step
        self._layer_of = {(id(layer.keys), id(layer.values)): i for i, layer in enumerate(cache.layers)}
        self.calls: Counter[int] = Counter()

    def write_kv(self, k_cache, v_cache, key, value) -> None:
        self.step.write_kv(k_cache, v_cache, key, value)

    def attend(self, query, k_cache, v_cache, **kwargs) -> torch.Tensor:
        self.calls[self._layer_of[(id(k_cache), id(v_cache))]] += 1
        return self.step.attend(query, k_cache, v_cache, **kwargs)


def probe_attention(model: torch.nn.Module) -> bool:
    """Run one tiny step (two short prompts packed in one row) through hf_cb's attention;
    raise `ModelNotSupported` unless every attention layer called the ``"hf_cb"`` function (which
    writes its K/V into the layer's pages and attends over them) exactly once, and the logits match
    the model's own forward. The model is left as it was (attention implementation, modes).

    Returns whether the engine must install `add_step_hooks`: True for a model whose decoder
    layers do not pass keyword arguments on to their attention (StableLM, Nemotron), which
    passes the probe only with the hooks."""
    register()
    name = type(model).__name__
    windows, shape = layer_windows(model), attention_shape(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    prompts = [(torch.arange(n) * 7 + 3 + i) % vocab for i, n in enumerate(_PROBE_LENGTHS)]
    original = _attn_implementations(model.config)
    with torch.no_grad(), _eval_mode(model):
        expected = torch.cat([_plain_logits(model, p) for p in prompts])
        try:
            _switch(model, name)
            try:
                _check_step(model, name, prompts, windows, shape, expected)
                return False
            except ModelNotSupported as refusal:
                hooks = add_step_hooks(model)
                try:
                    _check_step(model, name, prompts, windows, shape, expected)
                except ModelNotSupported:
                    raise refusal from refusal.__cause__  # the reason without hooks
                finally:
                    for hook in hooks:
                        hook.remove()
                return True
        finally:
            model.set_attn_implementation(original)


def add_step_hooks(model: torch.nn.Module) -> list[RemovableHandle]:
    """Forward pre-hooks that hand the step keyword (`STEP_KWARG`) to every module with a
    ``layer_idx`` whose forward takes the cache and ``**kwargs`` (the attention
    modules), for models whose decoder layers drop the keyword arguments of ``model(...)``.
    Outside an engine step they do nothing; ``handle.remove()`` takes them off."""
    return [
        module.register_forward_pre_hook(_hand_step, with_kwargs=True)
        for module in model.modules()
        if hasattr(module, "layer_idx") and _takes_cache_and_kwargs(module)
    ]


def _takes_cache_and_kwargs(module: torch.nn.Module) -> bool:
    params = inspect.signature(module.forward).parameters.values()
    return any(p.name in _CACHE_NAMES for p in params) and any(p.kind is p.VAR_KEYWORD for p in params)


def _hand_step(module, args, kwargs):
    cache = next((kwargs[k] for k in _CACHE_NAMES if kwargs.get(k) is not None), None)
    if isinstance(cache, PagedCache) and in_step() and STEP_KWARG not in kwargs:
        return args, {**kwargs, STEP_KWARG: True}
    return None


def _attn_implementations(config) -> dict:
    """The config's attention implementation and its sub-configs', in the form
    `set_attn_implementation` takes, so that a restore puts back each one. A sub-config never
    set (None) cannot be set back to None: it gets the top-level one, as a plain string would."""
    top = config._attn_implementation
    subs = {key: getattr(config, key, None) for key in config.sub_configs}
    return {"": top, **{key: c._attn_implementation or top for key, c in subs.items() if c is not None}}


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off for the probe; each module's own training flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _plain_logits(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    """The model's own logits for one prompt, under its own attention implementation."""
    ids = prompt.to(model.device)[None]
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0].float()


def _switch(model: torch.nn.Module, name: str) -> None:
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, ImportError) as error:
        raise ModelNotSupported(f"{name} refuses the attention implementation {ATTENTION_NAME!r}: {error}") from error
    # For a class whose module has no AttentionInterface dispatch, Transformers (5.17 to 5.23)
    # logs a warning and keeps the old implementation. The decoder's config is what counts: a
    # multimodal wrapper may stay as it was while its language model switches.
    if model.config.get_text_config(decoder=True)._attn_implementation != ATTENTION_NAME:
        raise ModelNotSupported(
            f"{name} cannot switch its attention implementation to {ATTENTION_NAME!r}: "
            "its attention does not go through transformers' AttentionInterface"
        )


def _check_step(model, name, prompts, windows, shape, expected) -> None:
    step, logits = _probe_step(model, name, prompts, windows, shape)
    _check_layers(name, step, shape.num_layers)
    _check_logits(name, logits, expected, _MAX_LOGIT_ERROR.get(model.dtype, _MAX_LOGIT_ERROR_HALF))


def _probe_step(model, name, prompts, windows, shape) -> tuple[RecordingStep, torch.Tensor]:
    """One step of the packed prompts, with the arguments `ModelRunner` passes."""
    lengths = [len(p) for p in prompts]
    pages_per_seq = -(-max(lengths) // _PROBE_PAGE_SIZE)
    num_pages = len(prompts) * pages_per_seq
    device = model.device
    cache = PagedCache(
        shape.num_layers, num_pages, _PROBE_PAGE_SIZE, shape.num_kv_heads, shape.head_dim,
        model.dtype, device, sliding_layers=[w is not None for w in windows],
    )
    manager = PageManager(num_pages, _PROBE_PAGE_SIZE, len(prompts), pages_per_seq)
    for seq_id, n in enumerate(lengths):
        manager.allocate(seq_id, n)
    table = manager.build(list(range(len(prompts))), [0] * len(prompts), lengths)
    step = RecordingStep(TorchAttentionBackend(_PROBE_PAGE_SIZE, device).plan(table), cache)
    try:
        logits = forward_step(
            model, model, cache, step, torch.cat(prompts).to(device)[None],
            torch.from_numpy(table.positions).to(device)[None],
            torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device), torch.arange(table.num_tokens, device=device),
        )
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # the model's own code failed on hf_cb's inputs: say where
        raise ModelNotSupported(
            f"{name} failed a probe step through hf_cb's attention after {len(step.calls)} of "
            f"{shape.num_layers} layers called the attention interface with hf_cb's step: "
            f"{type(error).__name__}: {error}"
        ) from error
    return step, logits.float()


def _check_layers(name: str, step: RecordingStep, num_layers: int) -> None:
    missing = [i for i in range(num_layers) if step.calls[i] == 0]
    if missing:
        raise ModelNotSupported(
            f"{name}: {len(missing)} of {num_layers} attention layers did not call the attention interface "
            f"(layers {missing}); hf_cb serves models whose every layer does"
        )
    # Each call writes the layer's K/V: a second call in one step (two modules with one
    # layer_idx) would overwrite the first's.
    repeated = [i for i in range(num_layers) if step.calls[i] > 1]
    if repeated:
        raise ModelNotSupported(f"{name}: attention layers {repeated} wrote K/V more than once in one step")


def _check_logits(name: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    spread = (expected - expected.mean(-1, keepdim=True)).norm(dim=-1).clamp_min(1e-6)
    error = float(((got - expected).norm(dim=-1) / spread).max())
    if not error <= tolerance:  # NaN too
        raise ModelNotSupported(
            f"{name} computes different logits through hf_cb (relative error {error:.3f} on a "
            "packed probe step): its forward depends on more than position_ids and the Cache, "
            "e.g. positions taken from the attention mask or the input ids"
        )
