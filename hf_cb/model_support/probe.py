"""Which models hf_cb can serve, judged by what they do, not by the flags their class sets.

`probe_attention` runs one tiny packed step through hf_cb's attention and checks that every
attention layer attended (and so wrote its K/V) once through the ``"hf_cb"`` function, and that
the logits equal the model's own forward.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from hf_cb.attention.backends.torch_backend import TorchAttentionBackend
from hf_cb.attention.context import AttentionStep, in_step
from hf_cb.attention.forward import forward_step
from hf_cb.attention.shape import AttentionShape
from hf_cb.attention_interface import ATTENTION_NAME, STEP_KWARG, register
from hf_cb.manager import PageManager
from hf_cb.model_support.shape import (
    ModelNotSupported,
    check_heads,
    eval_mode,
    is_device_fault,
    layer_kinds,
    read_attention,
)
from hf_cb.paged_cache import PagedCache

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


class RecordingStep:
    """A backend step that counts, per cache layer, the K/V writes of a step (each layer writes
    once: in the attention op, or, for a ``context`` layer, in its cache update) and, in all,
    the attention calls. Layers are told apart by their page tensors, which `paged_attention`
    takes by the attention module's ``layer_idx``."""

    def __init__(self, step: AttentionStep, cache: PagedCache):
        self.step = step
        self._layer_of = {(id(layer.keys), id(layer.values)): i for i, layer in enumerate(cache.layers)}
        self.writes: Counter[int] = Counter()
        self.attends = 0
        # What the backend step (hf_cb's code) raised, if it did: it reaches the probe through
        # the model's frames, and must not be taken for the model's failure.
        self.error: Exception | None = None

    def write_kv(self, k_cache, v_cache, key, value) -> None:
        self.writes[self._layer_of[(id(k_cache), id(v_cache))]] += 1
        self._recorded(self.step.write_kv, k_cache, v_cache, key, value)

    def attend(self, query, k_cache, v_cache, **kwargs) -> torch.Tensor:
        self.attends += 1
        return self._recorded(self.step.attend, query, k_cache, v_cache, **kwargs)

    def gather(self, k_cache, v_cache):
        return self._recorded(self.step.gather, k_cache, v_cache)

    def attend_context(self, query, key, value, **kwargs) -> torch.Tensor:
        self.attends += 1
        return self._recorded(self.step.attend_context, query, key, value, **kwargs)

    def _recorded(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)``, keeping what it raises in `error`."""
        try:
            return call(*args, **kwargs)
        except Exception as error:
            self.error = error
            raise


@dataclass(frozen=True)
class Probe:
    """What the probe found: the model's attention, layer by layer, and whether its steps need
    `add_step_hooks` (decoder layers that drop keyword arguments: StableLM, Nemotron)."""

    shape: AttentionShape
    needs_hooks: bool


def probe_attention(model: torch.nn.Module) -> Probe:
    """Read the model's attention (`read_attention`), then run one tiny step (two short prompts
    packed in one row) through hf_cb's attention; raise `ModelNotSupported` unless every
    attention layer wrote its K/V and attended exactly once through the ``"hf_cb"`` function and
    the logits match the model's own forward. The model is left as it was (attention
    implementation, modes). What is not the model's doing (out of memory, a device fault, an
    error in hf_cb's own backend) propagates as raised, and is not retried with hooks."""
    register()
    name = type(model).__name__
    layer_kinds(model)  # what the config says the layers do, before anything runs them
    check_heads(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    prompts = [(torch.arange(n) * 7 + 3 + i) % vocab for i, n in enumerate(_PROBE_LENGTHS)]
    original = _attn_implementations(model.config)
    with torch.no_grad(), eval_mode(model):
        expected = torch.cat([_plain_logits(model, p) for p in prompts])
        try:
            _switch(model, name)
            shape = read_attention(model)
            try:
                _check_step(model, name, prompts, shape, expected)
                return Probe(shape, needs_hooks=False)
            except ModelNotSupported as refusal:
                hooks = add_step_hooks(model)
                try:
                    _check_step(model, name, prompts, shape, expected)
                except ModelNotSupported:
                    raise refusal from refusal.__cause__  # the reason without hooks
                finally:
                    for hook in hooks:
                        hook.remove()
                return Probe(shape, needs_hooks=True)
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


def _check_step(model, name, prompts, shape, expected) -> None:
    step, logits = _probe_step(model, name, prompts, shape)
    _check_layers(name, step, shape.num_layers)
    _check_logits(name, logits, expected, _MAX_LOGIT_ERROR.get(model.dtype, _MAX_LOGIT_ERROR_HALF))


def _probe_step(model, name, prompts, shape) -> tuple[RecordingStep, torch.Tensor]:
    """One step of the packed prompts, with the arguments `ModelRunner` passes."""
    lengths = [len(p) for p in prompts]
    pages_per_seq = -(-max(lengths) // _PROBE_PAGE_SIZE)
    num_pages = len(prompts) * pages_per_seq
    device = model.device
    cache = PagedCache(shape.layers, num_pages, _PROBE_PAGE_SIZE, model.dtype, device)
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
    except Exception as error:
        if _not_the_models(error, step.error):
            raise
        # The model's own code failed on hf_cb's inputs: say where.
        raise ModelNotSupported(
            f"{name} failed a probe step through hf_cb's attention after {len(step.writes)} of "
            f"{shape.num_layers} layers called the attention interface with hf_cb's step: "
            f"{type(error).__name__}: {error}"
        ) from error
    return step, logits.float()


def _not_the_models(error: Exception, backend_error: Exception | None) -> bool:
    """Whether ``error`` says nothing about the model: the device failed (out of memory, a
    fault), or hf_cb's own backend step raised it (``backend_error``), or a model's handler
    raised it while handling that."""
    if is_device_fault(error):
        return True
    cause: BaseException | None = error
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:  # a chain can loop back on itself
        if cause is backend_error:
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _check_layers(name: str, step: RecordingStep, num_layers: int) -> None:
    missing = [i for i in range(num_layers) if step.writes[i] == 0]
    if missing:
        raise ModelNotSupported(
            f"{name}: {len(missing)} of {num_layers} attention layers did not call the attention interface "
            f"(layers {missing}); hf_cb serves models whose every layer does"
        )
    # Each write is the layer's K/V for the step: a second one (two modules with one layer_idx)
    # would overwrite the first's.
    repeated = [i for i in range(num_layers) if step.writes[i] > 1]
    if repeated:
        raise ModelNotSupported(f"{name}: attention layers {repeated} wrote K/V more than once in one step (it runs a "
                                "layer's attention more than once per token, as differential or looped attention "
                                "does; hf_cb keeps one K/V per layer and token)")
    if step.attends != num_layers:
        raise ModelNotSupported(f"{name}: {step.attends} attention calls in a step of {num_layers} attention "
                                "layers; hf_cb serves models whose every layer attends once")


def _check_logits(name: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    spread = (expected - expected.mean(-1, keepdim=True)).norm(dim=-1).clamp_min(1e-6)
    error = float(((got - expected).norm(dim=-1) / spread).max())
    if not error <= tolerance:  # NaN too
        raise ModelNotSupported(
            f"{name} computes different logits through hf_cb (relative error {error:.3f} on a "
            "packed probe step of two sequences): its forward depends on more than position_ids and the "
            "Cache, e.g. positions taken from the input ids, the attention mask or the cache's length, which a "
            "step of several sequences cannot give it"
        )
