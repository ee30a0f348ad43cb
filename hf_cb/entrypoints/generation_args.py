"""What `generate`'s arguments mean to hf_cb: the prompts, each request's `SamplingParams`,
and the generation modes hf_cb does not reproduce (they go to stock `generate`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StopStringCriteria

from hf_cb.sampling.params import SamplingParams

# generate() arguments that change decoding in ways hf_cb does not reproduce, with the value
# that means "off". A config that sets any of them to something else goes to stock generate.
# Not here, since they change nothing generate returns for a decoder-only model: use_cache (MPT's
# checkpoints set it False; decoding without a cache gives the same tokens) and the encoder_*
# processors (which read an encoder's input, and stock generate skips without one).
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
    "max_time": (None,),
    "guidance_scale": (None, 1, 1.0),
    "no_repeat_ngram_size": (None, 0),
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
}
# Keyword arguments of generate() that only stock generate honours.
STOCK_ONLY_KWARGS = (
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
    "assistant_tokenizer", "negative_prompt_ids", "negative_prompt_attention_mask",
    "custom_generate", "inputs_embeds", "past_key_values", "cache", "synced_gpus",
)


# Stopping criteria of Transformers' own that the engine applies itself (a list of only these
# runs on hf_cb; any other criterion is code hf_cb cannot run, and goes to stock generate).
OWN_CRITERIA = (MaxLengthCriteria, EosTokenCriteria, StopStringCriteria)


def criteria_reason(criteria: Any, tokenizer: Any) -> str | None:
    """Why a ``stopping_criteria`` list cannot run on hf_cb, or None if it can."""
    others = sorted({type(c).__name__ for c in criteria if not isinstance(c, OWN_CRITERIA)})
    if others:
        return f"`stopping_criteria` holds {others}, not only Transformers' max-length, EOS and stop-string criteria"
    if tokenizer is None and any(isinstance(c, StopStringCriteria) for c in criteria):
        return "a StopStringCriteria without tokenizer="
    return None


@dataclass(frozen=True)
class CriteriaLimits:
    """What a list of `OWN_CRITERIA` stops on: the shortest ``max_length`` (None: none), the EOS
    token ids of its EOS criteria (None: it has none), its stop strings."""

    max_length: int | None
    eos_token_ids: tuple[int, ...] | None
    stop_strings: tuple[str, ...]


def read_criteria(criteria: Any) -> CriteriaLimits:
    """The `CriteriaLimits` of ``generate``'s prepared stopping criteria (its own, merged with the
    caller's: a caller's criterion replaces generate's of the same type, as stock generate runs
    them). Raises for a criterion of another kind."""
    reason = criteria_reason(criteria, tokenizer=True)
    if reason:
        raise ValueError(f"hf_cb cannot run these stopping criteria: {reason}")
    lengths = [c.max_length for c in criteria if isinstance(c, MaxLengthCriteria)]
    eos = [torch.as_tensor(c.eos_token_id).flatten().tolist() for c in criteria if isinstance(c, EosTokenCriteria)]
    stops = [s for c in criteria if isinstance(c, StopStringCriteria) for s in c.stop_strings]
    return CriteriaLimits(min(lengths) if lengths else None,
                          tuple(dict.fromkeys(t for ids in eos for t in ids)) if eos else None, tuple(stops))


def unsupported_reason(config: GenerationConfig) -> str | None:
    """Why hf_cb cannot run this generation config, or None if it can."""
    for name, neutral in _NEUTRAL_CONFIG.items():
        value = getattr(config, name, None)
        if value not in neutral:
            return f"{name}={value!r}"
    return None


def is_integer_tensor(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def prompts_from_inputs(inputs: Any, tokenizer: Any, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """The unpadded prompts of ``generate_batch_continuous``'s ``inputs``."""
    if isinstance(inputs, Mapping):  # BatchEncoding or dict
        attention_mask = inputs.get("attention_mask", attention_mask)
        inputs = inputs["input_ids"]
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() != 2:
            raise ValueError(f"a tensor of inputs must be [batch, length], got shape {tuple(inputs.shape)}")
        if not is_integer_tensor(inputs):  # a float tensor would be silently truncated
            raise ValueError(f"input_ids must be an integer tensor (token ids), got {inputs.dtype}")
        return unpad(inputs, attention_mask)
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


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Rows of a (left- or right-) padded batch without their padding."""
    rows = input_ids.tolist()
    if attention_mask is None:
        return rows
    keep = attention_mask.bool().tolist()
    return [[t for t, k in zip(row, mask) if k] for row, mask in zip(rows, keep)]


def per_input(name: str, value: Any, n: int) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} inputs")
        return list(value)
    return [value] * n


def params_from_config(config: GenerationConfig, prompt_len: int, max_new_tokens: int | None, *,
                       presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                       logprobs: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    """A request's sampling parameters, read from a prepared generation config as `generate`
    does, plus what `generate` has no name for (OpenAI's penalties, log-probabilities)."""
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
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        eos_token_ids=eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
