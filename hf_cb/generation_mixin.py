"""The generation entry points: `generate_batch_continuous` on every model and the drop-in
`generate` (``hf_cb.enable(model)`` or ``custom_generate=hf_cb.generate``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput

from hf_cb.core.config import EngineConfig
from hf_cb.core.sequence import Completion, Sequence
from hf_cb.engine.llm_engine import LLMEngine
from hf_cb.engine.on_model import get_engine
from hf_cb.entrypoints.generation_args import (
    STOCK_ONLY_KWARGS,
    criteria_reason,
    is_integer_tensor,
    params_from_config,
    per_input,
    prompts_from_inputs,
    read_criteria,
    unpad,
    unsupported_reason,
)
from hf_cb.entrypoints.stopping import StopStrings, StreamerFeed
from hf_cb.sampling.params import random_seed, sample_seed

_STOCK_GENERATE_ATTR = "_hf_cb_stock_generate"
logger = logging.getLogger("hf_cb")
Hook = Callable[[LLMEngine, list[Sequence]], None]

# -- generate_batch_continuous ---------------------------------------------------------------


def _run(engine: LLMEngine, prompts, params, seeds, progress: bool, hooks: list[Hook] = ()) -> list[Sequence]:
    """Check every request, then queue and run them all; sequences in input order. ``hooks``
    see each step's updated sequences (stop strings, streamers)."""
    if engine.owner is not None:
        raise RuntimeError("an OnlineEngine (a server) steps this model's engine: submit requests through it, "
                           "or shut it down first")
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.check_request(i, prompt, p)
    seqs = [engine.add_request(pr, p, s, i) for i, (pr, p, s) in enumerate(zip(prompts, params, seeds))]

    def on_step(updated: list[Sequence]) -> None:
        for hook in hooks:
            hook(engine, updated)

    engine.run(seqs, progress=progress, on_step=on_step if hooks else None)
    return seqs


def generate_batch_continuous(
    self: torch.nn.Module,
    inputs: Any,
    generation_config: GenerationConfig | None = None,
    *,
    tokenizer: Any = None,
    engine_config: EngineConfig | None = None,
    progress: bool | None = None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    **generate_kwargs: Any,
) -> list[Completion]:
    """Generate for every input with continuous batching; one `Completion` per sequence, in
    input order (``num_return_sequences`` completions per input, grouped by input).

    ``inputs``: ``list[list[int]]``, ``list[str]`` (with ``tokenizer``), a LongTensor ``[B, L]``
    (with ``attention_mask=`` to drop padding) or a BatchEncoding. ``generate_kwargs`` mean what
    they mean in ``model.generate`` (``stop_strings`` with ``tokenizer`` too); ``max_new_tokens``
    and ``seed`` may also be lists with one value per input. ``logprobs=k``: each token's
    log-probability and the ``k`` most likely alternatives, in ``Completion.logprobs``;
    ``prompt_logprobs=k`` (vLLM's): the same for every prompt token after the first, in
    ``Completion.prompt_logprobs`` (such a prompt is computed, never taken from the prefix cache).
    ``presence_penalty`` / ``frequency_penalty``: OpenAI's, over the generated tokens.
    ``progress``: a tqdm bar; None shows it for 32 or more sequences.
    """
    attention_mask = generate_kwargs.pop("attention_mask", None)
    max_new = generate_kwargs.pop("max_new_tokens", None)
    seed = generate_kwargs.pop("seed", None)
    prompts = prompts_from_inputs(inputs, tokenizer, attention_mask)
    if not prompts:
        return []
    config, unused = self._prepare_generation_config(generation_config, **generate_kwargs)
    if unused:
        raise TypeError(f"generate_batch_continuous got unexpected arguments: {sorted(unused)}")
    reason = unsupported_reason(config)
    if reason:
        raise ValueError(f"hf_cb does not support this generation mode ({reason}); use model.generate")

    hooks: list[Hook] = []
    if config.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings need tokenizer=")
        hooks.append(StopStrings(tokenizer, config.stop_strings))
    n = config.num_return_sequences or 1
    max_news = per_input("max_new_tokens", max_new, len(prompts))
    seeds = per_input("seed", seed, len(prompts))
    base_params = [
        params_from_config(config, len(p), m, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                           logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        for p, m in zip(prompts, max_news)
    ]
    req_prompts, req_params, req_seeds = [], [], []
    for prompt, params, s in zip(prompts, base_params, seeds):
        for j in range(n):
            req_prompts.append(prompt)
            req_params.append(params)
            req_seeds.append(random_seed() if s is None else sample_seed(int(s), j))

    engine = get_engine(self, engine_config)
    show = len(req_prompts) >= 32 if progress is None else progress
    seqs = _run(engine, req_prompts, req_params, req_seeds, show, hooks)
    return [
        Completion(
            prompt_ids=s.prompt_ids,
            token_ids=s.output_ids,
            finish_reason=s.finish_reason,
            text=tokenizer.decode(s.output_ids, skip_special_tokens=True) if tokenizer is not None else None,
            logprobs=s.logprobs,
            prompt_logprobs=s.prompt_logprobs,
            num_cached_tokens=s.num_prefix_hit_tokens or 0,
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
    hf_cb_streamer: Any = None,
    hf_cb_stop_strings: str | list[str] | None = None,
    hf_cb_tokenizer: Any = None,
    **model_kwargs: Any,
) -> torch.LongTensor | GenerateDecoderOnlyOutput:
    """`model.generate(..., custom_generate=hf_cb.generate)`: `generate` has prepared the inputs
    and the config; this returns what stock `generate` returns, computed by the engine.

    The logits processors and stopping criteria `generate` built are not run: the engine
    applies the same rules, from the config and from the criteria (only Transformers' own:
    max length, EOS tokens, stop strings; a config or criterion it cannot honour raises).
    Transformers hands a custom generate neither the streamer nor the tokenizer, so `enable`
    passes them, and ``stop_strings``, as the ``hf_cb_*`` arguments.
    """
    reason = unsupported_reason(generation_config)
    if reason:
        raise ValueError(f"hf_cb does not support this generation mode ({reason})")
    batch, prompt_len = input_ids.shape
    prompts = unpad(input_ids, model_kwargs.get("attention_mask"))
    # The criteria generate prepared (its own from the config, a caller's replacing one of a
    # type): the same limits, applied by the engine.
    limits = read_criteria(stopping_criteria or [])
    max_length = min(generation_config.max_length, limits.max_length or generation_config.max_length)
    params = params_from_config(generation_config, prompt_len, max_length - prompt_len)
    if limits.eos_token_ids is not None or stopping_criteria:
        params = replace(params, eos_token_ids=limits.eos_token_ids or ())
    stops = [*([hf_cb_stop_strings] if isinstance(hf_cb_stop_strings, str) else hf_cb_stop_strings or []),
             *limits.stop_strings]
    hooks: list[Hook] = []
    if stops:
        if hf_cb_tokenizer is None:
            raise ValueError("stop strings need a tokenizer (generate's tokenizer=)")
        hooks.append(StopStrings(hf_cb_tokenizer, stops))
    feed = StreamerFeed(hf_cb_streamer, input_ids) if hf_cb_streamer is not None else None
    if feed is not None:
        hooks.append(feed)  # after the stop strings: a stop cuts tokens before they are streamed
    engine = get_engine(model, engine_config)
    seqs = _run(engine, prompts, [params] * batch, [random_seed() for _ in range(batch)], False, hooks)
    if feed is not None:
        feed.end()

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


def _drop_in_config(model: torch.nn.Module, inputs, generation_config,
                    kwargs: dict) -> tuple[GenerationConfig | None, str | None]:
    """(the prepared config of a generate() call hf_cb runs, None) or (None, why it goes to
    stock generate: a mode hf_cb does not handle, or inputs stock generate refuses itself)."""
    stock_only = next((k for k in STOCK_ONLY_KWARGS if _is_set(kwargs.get(k)) and k != "stopping_criteria"), None)
    if stock_only is not None:
        return None, f"`{stock_only}` is given"
    if _is_set(kwargs.get("stopping_criteria")):  # Transformers' own criteria run on the engine
        reason = criteria_reason(kwargs["stopping_criteria"], kwargs.get("tokenizer"))
        if reason:
            return None, reason
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] == 0 or not is_integer_tensor(ids):
        return None, "the inputs are not a non-empty [batch, length] tensor of token ids"
    if kwargs.get("streamer") is not None and ids.shape[0] != 1:  # Transformers: batch size 1 only
        return None, "a streamer with a batch of more than one"
    config, _ = model._prepare_generation_config(generation_config, **kwargs)
    if config.stop_strings and kwargs.get("tokenizer") is None:
        return None, "stop_strings without a tokenizer"
    reason = unsupported_reason(config)
    return (None, f"the generation config sets {reason}") if reason else (config, None)


def enable(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model.generate`` the continuous-batching drop-in (idempotent). Modes hf_cb does
    not handle (beam search, assisted decoding, custom processors...) go to the stock
    `generate` unchanged, with a warning naming the reason (once per reason and model)."""
    if _STOCK_GENERATE_ATTR in model.__dict__:
        return model
    stock = model.generate
    own = model.__dict__.get("generate")  # an instance-level generate to restore on disable

    told: set[str] = set()  # each reason for stock generate is logged once per model

    def generate_(inputs=None, generation_config=None, **kwargs):
        config, reason = _drop_in_config(model, inputs, generation_config, kwargs)
        if config is None:
            if reason not in told:
                told.add(reason)
                logger.warning("hf_cb: this generate() call runs stock Transformers generate, not the "
                               "continuous-batching engine: %s (logged once per reason)", reason)
            return stock(inputs, generation_config, **kwargs)
        # Transformers drops a custom generate's streamer and tokenizer: pass them as ours.
        ours = {"hf_cb_streamer": kwargs.pop("streamer", None)}
        if config.stop_strings:
            ours.update(hf_cb_stop_strings=config.stop_strings, hf_cb_tokenizer=kwargs.pop("tokenizer"))
            kwargs["stop_strings"] = None
        elif kwargs.get("tokenizer") is not None:  # a StopStringCriteria's stop strings need it
            ours["hf_cb_tokenizer"] = kwargs.pop("tokenizer")
        return stock(inputs, generation_config, custom_generate=generate, **kwargs, **ours)

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
