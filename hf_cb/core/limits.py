"""What a request may ask of an engine, checkable away from it (the HTTP front end's process)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

from hf_cb.sampling.params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask of an engine; checkable away from it (an HTTP front end)."""

    vocab_size: int
    max_model_len: int
    page_size: int
    num_pages: int

    def check(self, index: int, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise a ValueError naming the problem if the request can never run."""
        if len(prompt_ids) == 0:
            raise ValueError(f"prompt {index} is empty")
        # type() is, not isinstance: a bool is an int to isinstance. min/max run in C.
        if not all(type(t) is int for t in prompt_ids):
            bad = next(t for t in prompt_ids if type(t) is not int)
            raise ValueError(f"prompt {index} has a token id that is not an integer: {bad!r}")
        lo, hi = min(prompt_ids), max(prompt_ids)
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompt {index} has token id {bad} outside the vocabulary (size {self.vocab_size})")
        # EOS ids index the logits (the min_new_tokens ban): one outside would fail the step.
        bad = [t for t in params.eos_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt {index} has {len(prompt_ids)} tokens and asks for {params.max_new_tokens} "
                f"new tokens: {total} exceeds the model's context of {self.max_model_len}"
            )
        pages = -(-total // self.page_size)
        if pages > self.num_pages:
            raise ValueError(
                f"prompt {index} needs {pages} pages ({total} tokens) but the page pool has "
                f"{self.num_pages}; raise EngineConfig.num_pages"
            )
