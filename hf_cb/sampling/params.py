"""`SamplingParams`: how one request picks its tokens and when it stops; and request seeds."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # most alternatives per token (vLLM's default cap; OpenAI allows 20)
# Below this a sampling temperature picks the most likely token (vLLM's _SAMPLING_EPS): dividing the
# logits by 1e-300, which float32 holds as 0, would make them inf and NaN.
MIN_TEMPERATURE = 1e-5
INT64 = (-(2**63), 2**63 - 1)  # what the step's tensors hold
_INTS = ("max_new_tokens", "min_new_tokens", "top_k")
_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops. Neutral values switch a processor off.

    ``eos_token_ids``: every token id that ends the sequence (the model's EOS unless ignored, and
    any stop token ids); banned until ``min_new_tokens`` are generated. ``logprobs``: None for
    none, else the chosen token's log-probability and the ``logprobs`` most likely alternatives.
    ``prompt_logprobs`` (vLLM's name): likewise for every prompt token after the first, under the
    tokens before it.
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    eos_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        self._check_types()
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")

    def _check_types(self) -> None:
        """Every value as the step's tensors take it: an int (not a bool) within int64, a finite
        float. A value that passed here can never make a step fail (an int past int64 did)."""
        ints = {name: getattr(self, name) for name in _INTS}
        ints.update({f"eos_token_ids[{i}]": t for i, t in enumerate(self.eos_token_ids)})
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                ints[name] = getattr(self, name)
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not INT64[0] <= value <= INT64[1]:
                raise ValueError(f"{name} is outside the 64-bit integer range: {value}")
        for name in _FLOATS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be a bool, got {self.do_sample!r}")

    @property
    def samples(self) -> bool:
        """Whether the token is drawn at random: sampling at a temperature of at least
        `MIN_TEMPERATURE` (below, the most likely token, as the limit of sampling)."""
        return self.do_sample and self.temperature >= MIN_TEMPERATURE

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the tokens generated so far (a penalty), so the host must know
        them before the next step is prepared."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def check_seed(seed: int) -> None:
    """Raise a ValueError unless ``seed`` is an integer the step's int64 tensors hold."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not INT64[0] <= seed <= INT64[1]:
        raise ValueError(f"seed is outside the 64-bit integer range: {seed}")


def random_seed() -> int:
    """A seed for an unseeded request, drawn from torch's generator, so that
    ``torch.manual_seed`` makes unseeded calls repeatable."""
    return int(torch.randint(0, 2**62, (1,)).item())


def sample_seed(seed: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of a seeded request with ``n`` samples: distinct
    streams, the same ones every time."""
    return (seed * 0x9E3779B1 + sample_index) % (1 << 62)
