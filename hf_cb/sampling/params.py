"""`SamplingParams`: how one request picks its tokens and when it stops; and request seeds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # most alternatives per token (vLLM's default cap; OpenAI allows 20)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops. Neutral values switch a processor off.

    ``eos_token_ids``: every token id that ends the sequence (the model's EOS unless ignored, and
    any stop token ids); banned until ``min_new_tokens`` are generated. ``logprobs``: None for
    none, else the chosen token's log-probability and the ``logprobs`` most likely alternatives.
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

    def __post_init__(self) -> None:
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
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the tokens generated so far (a penalty), so the host must know
        them before the next step is prepared."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def random_seed() -> int:
    """A seed for an unseeded request, drawn from torch's generator, so that
    ``torch.manual_seed`` makes unseeded calls repeatable."""
    return int(torch.randint(0, 2**62, (1,)).item())


def sample_seed(seed: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of a seeded request with ``n`` samples: distinct
    streams, the same ones every time."""
    return (seed * 0x9E3779B1 + sample_index) % (1 << 62)
