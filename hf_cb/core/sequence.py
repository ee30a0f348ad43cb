"""Typed records of a request while it runs (`Sequence`) and when it is done (`Completion`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Literal

from hf_cb.sampling.params import SamplingParams

# "abort": cancelled by its caller (a client that went away) or failed by the engine.
FinishReason = Literal["stop", "length", "abort"]
PENDING = -1  # a token sampled on the device whose value the host has not read yet


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model, and the most likely alternatives
    (``(token_id, logprob)``, most likely first) when asked for."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None  # its rank among the vocabulary, 1 for the most likely (prompt tokens)


@dataclass(eq=False)
class Sequence:
    """One generated sequence: its tokens so far and how many of them have K/V in the cache.

    ``token_ids[num_cached_tokens:]`` is what the next step must feed; once that is fed, the
    step's logits give the next token. After a preemption ``num_cached_tokens`` drops to 0 and
    the prompt and the tokens generated so far are recomputed.

    With overlapped scheduling a sampled token is first appended as `PENDING` (its value is
    still on the device; ``pending_src`` is its row in that step's sampled tokens) and filled in
    by `resolve` one step later; an EOS found then truncates what was appended after it. Pending
    tokens are always the last ``num_pending`` ones.
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
    num_pending: int = 0
    pending_src: int = -1
    logprobs: list[TokenLogprob | None] | None = None  # one per generated token, when asked for
    # Prefix caching: chained hashes of the full pages hashed so far, how many of this
    # sequence's pages are registered in the cache, and the prompt tokens its first admission
    # found cached (vLLM's num_cached_tokens; None until admitted).
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_pages: int = 0
    num_prefix_hit_tokens: int | None = None
    # After a failed step: whether it has since sampled a token in a step of its own (so a later
    # failure of a step it shares is not its own).
    passed_alone: bool = False
    # With params.prompt_logprobs: one entry per prompt token (None for the first), filled in as
    # the prefill steps that score them resolve.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Models with recurrent state: where this sequence's prefill stops for its waiting twins (the
    # other samples of its prompt) to take copies of its state (`state_scheduler`).
    fork_point: int | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_resolved(self) -> int:
        """Generated tokens whose values the host knows (all but the pending tail)."""
        return self.num_generated - self.num_pending

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_done(self) -> bool:
        """Finished, and every token's value known."""
        return self.is_finished and self.num_pending == 0

    def append_pending(self, src: int) -> None:
        """A token was sampled (row ``src`` of its step's tokens); finish on length."""
        self.token_ids.append(PENDING)
        if self.logprobs is not None:
            self.logprobs.append(None)
        self.num_pending += 1
        self.pending_src = src
        if self.num_generated >= self.params.max_new_tokens:
            self.finish_reason = "length"

    def resolve(self, index: int, token_id: int, logprob: TokenLogprob | None = None) -> bool:
        """Fill in the pending token at ``index``; return True if it is an EOS that ends the
        sequence. The caller skips tokens at or past ``num_tokens`` (dropped after an EOS)."""
        self.token_ids[index] = token_id
        if self.logprobs is not None:
            self.logprobs[index - len(self.prompt_ids)] = logprob
        self.num_pending -= 1
        # EOS cannot arrive before min_new_tokens: the sampler bans it until then.
        if token_id not in self.params.eos_token_ids:
            return False
        self.truncate(index + 1 - len(self.prompt_ids))
        self.finish_reason = "stop"
        return True

    def truncate(self, num_generated: int) -> None:
        """Keep the first ``num_generated`` generated tokens, all of them resolved: tokens after
        them (pending ones included) are dropped, and their values ignored when they arrive."""
        assert num_generated <= self.num_resolved, "only resolved tokens can be kept"
        del self.token_ids[len(self.prompt_ids) + num_generated :]
        self.block_hashes.clear()  # rehashed if ever needed (a truncated sequence is ending)
        if self.logprobs is not None:
            del self.logprobs[num_generated:]
        self.num_pending = 0


@dataclass
class Completion:
    """What `generate_batch_continuous` returns for each generated sequence.

    Attributes:
        prompt_ids: the prompt, without padding.
        token_ids: generated tokens only; ends with the stop token when it stopped on one.
        finish_reason: ``"stop"`` (a stop token or string), ``"length"`` (``max_new_tokens``
            reached) or ``"abort"``.
        text: ``token_ids`` decoded with special tokens skipped, when a tokenizer was given.
        logprobs: one `TokenLogprob` per generated token, when ``logprobs=`` was given.
        num_cached_tokens: prompt tokens whose KV came from the prefix cache (as in vLLM).
        prompt_logprobs: with ``prompt_logprobs=``, one entry per prompt token: None for the
            first, then each token's `TokenLogprob` under the tokens before it (vLLM's).
    """

    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: FinishReason
    text: str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
