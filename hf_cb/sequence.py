"""Typed records of a request while it runs (`Sequence`) and when it is done (`Completion`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Literal

from .sampling import SamplingParams

FinishReason = Literal["stop", "length"]


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    """One generated sequence: its tokens so far and how many of them have K/V in the cache.

    ``token_ids[num_cached_tokens:]`` is what the next step must feed; once that is fed, the
    step's logits give the next token. After a preemption ``num_cached_tokens`` drops to 0 and
    the prompt and the tokens generated so far are recomputed.
    """

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> bool:
        """Add a sampled token; return True when the sequence is now finished."""
        self.token_ids.append(token_id)
        # EOS cannot arrive before min_new_tokens: the sampler bans it until then.
        if token_id in self.params.eos_token_ids:
            self.finish_reason = "stop"
        elif self.num_generated >= self.params.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None


@dataclass
class Completion:
    """What `generate_batch_continuous` returns for each generated sequence.

    Attributes:
        prompt_ids: the prompt, without padding.
        token_ids: generated tokens only; ends with the EOS token when it stopped on one.
        finish_reason: ``"stop"`` (an EOS token) or ``"length"`` (``max_new_tokens`` reached).
        text: ``token_ids`` decoded with special tokens skipped, when a tokenizer was given.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: FinishReason
    text: str | None = None
