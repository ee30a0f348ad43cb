"""Which models hf_cb can serve, judged by what they do, not by the flags their class sets.

`probe_attention` runs one tiny packed step through hf_cb's attention and checks that every
attention layer attended (and so wrote its K/V) once through the ``"hf_cb"`` function, and that
the logits equal the model's own forward. A model with recurrent state (linear attention,
state-space layers) runs batch-shaped steps instead, as the engine runs it: prefill chunks that
continue a state, and a decode step over two sequences' states (`probe_steps`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch.utils.hooks import RemovableHandle

from hf_cb.attention.context import in_step
from hf_cb.attention.shape import AttentionShape
from hf_cb.attention_interface import ATTENTION_NAME, STEP_KWARG, register
from hf_cb.model_support.probe_steps import (
    STATE_STEPS,
    WHOLE_PREFILL_STEPS,
    check_layers,
    check_logits,
    check_state_steps,
    packed_step,
)
from hf_cb.model_support.shape import (
    ModelNotSupported,
    check_heads,
    eval_mode,
    layer_kinds,
    read_attention,
)
from hf_cb.paged_cache import PagedCache

_CACHE_NAMES = ("cache", "past_key_values")  # Transformers 5.24 renamed the keyword
# Two sequences packed in one row, as the engine packs a step (`probe_steps`).
_PROBE_LENGTHS = (3, 5)


@dataclass(frozen=True)
class Probe:
    """What the probe found: the model's attention and recurrent states, layer by layer;
    whether its steps need `add_step_hooks` (decoder layers that drop keyword arguments:
    StableLM, Nemotron); and whether a prefill may continue a recurrent state over several
    tokens (False for models whose multi-token forward starts a fresh state, as Mamba's: each
    prompt is then prefilled in one step)."""

    shape: AttentionShape
    needs_hooks: bool
    chunked_prefill: bool = True


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
                return Probe(shape, needs_hooks=False, chunked_prefill=_check_step(model, name, prompts, shape, expected))
            except ModelNotSupported as refusal:
                hooks = add_step_hooks(model)
                try:
                    chunked = _check_step(model, name, prompts, shape, expected)
                except ModelNotSupported:
                    raise refusal from refusal.__cause__  # the reason without hooks
                finally:
                    for hook in hooks:
                        hook.remove()
                return Probe(shape, needs_hooks=True, chunked_prefill=chunked)
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


# Per token, |logits - own forward's| over the spread of the own forward's. Measured on random
# models: hf_cb and the model's own kernels differ by 0 in float32 (CPU and H200), up to 0.018
# in bf16 (12 layers, H200); positions taken from the wrong place give 0.05 (12 layers, small
# weights) to 0.3-1 (the tests' models). Only gross errors are refused in half precision.
_MAX_LOGIT_ERROR = {torch.float32: 0.01, torch.float64: 0.01}
_MAX_LOGIT_ERROR_HALF = 0.1


def _check_step(model, name, prompts, shape, expected) -> bool:
    """Raise `ModelNotSupported` unless hf_cb's steps give the model's own logits; return
    whether a prefill may continue a recurrent state over several tokens (chunked prefill)."""
    tolerance = _MAX_LOGIT_ERROR.get(model.dtype, _MAX_LOGIT_ERROR_HALF)
    if shape.stateful:
        try:
            check_state_steps(model, name, prompts, shape, expected, tolerance, STATE_STEPS)
            return True
        except ModelNotSupported as chunked:
            try:  # a model whose multi-token forward always starts a fresh state (Mamba's)
                check_state_steps(model, name, prompts, shape, expected, tolerance, WHOLE_PREFILL_STEPS)
            except ModelNotSupported:
                raise chunked from chunked.__cause__
            return False
    step, logits = packed_step(model, name, prompts, shape)
    check_layers(name, step, list(range(shape.num_layers)))
    check_logits(name, logits, expected, tolerance)
    return True


