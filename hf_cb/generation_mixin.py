"""The generation entry points: `generate_batch_continuous` on every model, the drop-in
`generate` (``hf_cb.enable(model)`` or ``custom_generate=hf_cb.generate``), and the engine that
lives on the model between calls."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .config import EngineConfig
from .engine import LLMEngine
from .model_engine import get_engine
from .sampling import SamplingParams, random_seed, sample_seed
from .sequence import Completion, Sequence

_STOCK_GENERATE_ATTR = "_hf_cb_stock_generate"

# generate() arguments that change decoding in ways hf_cb does not reproduce, with the value
# that means "off". A config that sets any of them to something else goes to stock generate.
_NEUTRAL_CONFIG = {
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "penalty_alpha": (None, 0, 0.0),
    "dola_layers": (None,),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
    "output_scores": (None, False),
    "output_logits": (None, False),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "stop_strings": (None,),
    "max_time": (None,),
    "guidance_scale": (None, 1, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "encoder_repetition_penalty": (None, 1, 1.0),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "typical_p": (None, 1, 1.0),
    "epsilon_cutoff": (None, 0, 0.0),
    "eta_cutoff": (None, 0, 0.0),
    "top_h": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "exponential_decay_length_penalty": (None,),
    "watermarking_config": (None,),
    "renormalize_logits": (None, False),
    "token_healing": (None, False),
    "cache_implementation": (None,),
    "use_cache": (None, True),
}
# Keyword arguments of generate() that only stock generate honours.
_STOCK_ONLY_KWARGS = (
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
    "assistant_tokenizer", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask",
    "custom_generate", "inputs_embeds", "past_key_values", "synced_gpus",
)


def unsupported_reason(config: GenerationConfig) -> str | None:
    """Why hf_cb cannot run this generation config, or None if it can."""
    for name, neutral in _NEUTRAL_CONFIG.items():
        value = getattr(config, name, None)
        if value not in neutral:
            return f"{name}={value!r}"
    return None


# -- generate_batch_continuous ---------------------------------------------------------------


def _prompts_from_inputs(inputs: Any, tokenizer: Any, attention_mask: torch.Tensor | None) -> list[list[int]]:
    if isinstance(inputs, Mapping):  # BatchEncoding or dict
        attention_mask = inputs.get("attention_mask", attention_mask)
        inputs = inputs["input_ids"]
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() != 2:
            raise ValueError(f"a tensor of inputs must be [batch, length], got shape {tuple(inputs.shape)}")
        return _unpad(inputs, attention_mask)
    if isinstance(inputs, str):
        raise TypeError("inputs must be a list of prompts; wrap a single string in a list")
    inputs = list(inputs)
    if inputs and all(isinstance(p, str) for p in inputs):
        if tokenizer is None:
            raise ValueError("text prompts need tokenizer=")
        return [list(ids) for ids in tokenizer(inputs)["input_ids"]]
    if all(isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p) for p in inputs):
        return [list(p) for p in inputs]
    raise TypeError(
        "inputs must be list[list[int]], list[str], a LongTensor [B, L] or a BatchEncoding"
    )


def _unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Rows of a (left- or right-) padded batch without their padding."""
    rows = input_ids.tolist()
    if attention_mask is None:
        return rows
    keep = attention_mask.bool().tolist()
    return [[t for t, k in zip(row, mask) if k] for row, mask in zip(rows, keep)]


def _per_input(name: str, value: Any, n: int) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} inputs")
        return list(value)
    return [value] * n


def _params(config: GenerationConfig, prompt_len: int, max_new_tokens: int | None) -> SamplingParams:
    """A request's sampling parameters, read from a prepared generation config as `generate` does."""
    if max_new_tokens is None:
        max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = config.max_length - prompt_len
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    min_new = config.min_new_tokens or max(0, (config.min_length or 0) - prompt_len)
    eos = config.eos_token_id
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return SamplingParams(
        max_new_tokens=int(max_new_tokens),
        min_new_tokens=int(min_new),
        do_sample=bool(config.do_sample),
        temperature=float(config.temperature if config.temperature is not None else 1.0),
        top_k=int(config.top_k or 0),
        top_p=float(config.top_p if config.top_p is not None else 1.0),
        min_p=float(config.min_p or 0.0),
        repetition_penalty=float(config.repetition_penalty or 1.0),
        eos_token_ids=eos,
    )


def _run(engine: LLMEngine, prompts, params, seeds, progress: bool) -> list[Sequence]:
    """Check every request, then queue and run them all; sequences in input order."""
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.check_request(i, prompt, p)
    seqs = [engine.add_request(pr, p, s, i) for i, (pr, p, s) in enumerate(zip(prompts, params, seeds))]
    engine.run(seqs, progress=progress)
    return seqs


def generate_batch_continuous(
    self: torch.nn.Module,
    inputs: Any,
    generation_config: GenerationConfig | None = None,
    *,
    tokenizer: Any = None,
    engine_config: EngineConfig | None = None,
    progress: bool | None = None,
    **generate_kwargs: Any,
) -> list[Completion]:
    """Generate for every input with continuous batching; one `Completion` per sequence, in
    input order (``num_return_sequences`` completions per input, grouped by input).

    ``inputs``: ``list[list[int]]``, ``list[str]`` (with ``tokenizer``), a LongTensor ``[B, L]``
    (with ``attention_mask=`` to drop padding) or a BatchEncoding. ``generate_kwargs`` mean what
    they mean in ``model.generate``; ``max_new_tokens`` and ``seed`` may also be lists with one
    value per input. ``progress``: a tqdm bar; None shows it for 32 or more sequences.
    """
    attention_mask = generate_kwargs.pop("attention_mask", None)
    max_new = generate_kwargs.pop("max_new_tokens", None)
    seed = generate_kwargs.pop("seed", None)
    prompts = _prompts_from_inputs(inputs, tokenizer, attention_mask)
    if not prompts:
        return []
    config, unused = self._prepare_generation_config(generation_config, **generate_kwargs)
    if unused:
        raise TypeError(f"generate_batch_continuous got unexpected arguments: {sorted(unused)}")
    reason = unsupported_reason(config)
    if reason:
        raise ValueError(f"hf_cb does not support this generation mode ({reason}); use model.generate")

    n = config.num_return_sequences or 1
    max_news = _per_input("max_new_tokens", max_new, len(prompts))
    seeds = _per_input("seed", seed, len(prompts))
    base_params = [_params(config, len(p), m) for p, m in zip(prompts, max_news)]
    req_prompts, req_params, req_seeds = [], [], []
    for prompt, params, s in zip(prompts, base_params, seeds):
        for j in range(n):
            req_prompts.append(prompt)
            req_params.append(params)
            req_seeds.append(random_seed() if s is None else sample_seed(int(s), j))

    engine = get_engine(self, engine_config)
    show = len(req_prompts) >= 32 if progress is None else progress
    seqs = _run(engine, req_prompts, req_params, req_seeds, show)
    return [
        Completion(
            prompt_ids=s.prompt_ids,
            token_ids=s.output_ids,
            finish_reason=s.finish_reason,
            text=tokenizer.decode(s.output_ids, skip_special_tokens=True) if tokenizer is not None else None,
        )
        for s in seqs
    ]


# -- the drop-in generate ---------------------------------------------------------------------


def generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    generation_config: GenerationConfig | None = None,
    engine_config: EngineConfig | None = None,
    **model_kwargs: Any,
) -> torch.LongTensor | GenerateDecoderOnlyOutput:
    """`model.generate(..., custom_generate=hf_cb.generate)`: `generate` has prepared the inputs
    and the config; this returns what stock `generate` returns, computed by the engine.

    The logits processors and stopping criteria `generate` built are not run: the engine
    applies the same rules from the config itself (a config it cannot honour raises).
    """
    reason = unsupported_reason(generation_config)
    if reason:
        raise ValueError(f"hf_cb does not support this generation mode ({reason})")
    batch, prompt_len = input_ids.shape
    prompts = _unpad(input_ids, model_kwargs.get("attention_mask"))
    params = _params(generation_config, prompt_len, generation_config.max_length - prompt_len)
    engine = get_engine(model, engine_config)
    seqs = _run(engine, prompts, [params] * batch, [random_seed() for _ in range(batch)], False)

    pad = generation_config.pad_token_id
    if pad is None:
        pad = params.eos_token_ids[0] if params.eos_token_ids else 0
    width = max(s.num_generated for s in seqs)
    out = torch.full((batch, width), pad, dtype=input_ids.dtype)
    for row, s in enumerate(seqs):
        out[row, : s.num_generated] = torch.tensor(s.output_ids, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, out.to(input_ids.device)], dim=1)
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences


def _is_set(value: Any) -> bool:
    if isinstance(value, list):  # LogitsProcessorList / StoppingCriteriaList
        return len(value) > 0
    return value is not None and value is not False


def _uses_stock(model: torch.nn.Module, inputs, generation_config, kwargs: dict) -> bool:
    """Whether a generate() call needs a mode hf_cb does not handle."""
    if any(_is_set(kwargs.get(k)) for k in _STOCK_ONLY_KWARGS):
        return True
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
        return True
    config, _ = model._prepare_generation_config(generation_config, **kwargs)
    return unsupported_reason(config) is not None


def enable(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model.generate`` the continuous-batching drop-in (idempotent). Modes hf_cb does
    not handle (beam search, assisted decoding, streamers, custom processors...) go to the
    stock `generate` unchanged."""
    if _STOCK_GENERATE_ATTR in model.__dict__:
        return model
    stock = model.generate
    own = model.__dict__.get("generate")  # an instance-level generate to restore on disable

    def generate_(inputs=None, generation_config=None, **kwargs):
        if _uses_stock(model, inputs, generation_config, kwargs):
            return stock(inputs, generation_config, **kwargs)
        return stock(inputs, generation_config, custom_generate=generate, **kwargs)

    generate_.__doc__ = stock.__doc__
    object.__setattr__(model, _STOCK_GENERATE_ATTR, own)
    object.__setattr__(model, "generate", generate_)
    return model


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `enable`."""
    if _STOCK_GENERATE_ATTR in model.__dict__:
        own = model.__dict__.pop(_STOCK_GENERATE_ATTR)
        if own is None:
            object.__delattr__(model, "generate")
        else:
            object.__setattr__(model, "generate", own)
    return model


def install() -> None:
    """Add `generate_batch_continuous` to every Transformers generative model (additive)."""
    if not hasattr(GenerationMixin, "generate_batch_continuous"):
        GenerationMixin.generate_batch_continuous = generate_batch_continuous
