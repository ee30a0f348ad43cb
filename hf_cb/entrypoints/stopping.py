"""Hooks on each step's new tokens, for the Transformers entry points: ``stop_strings`` with
Transformers' own semantics, and a Transformers streamer (`TextStreamer`, ...).

Both read only resolved tokens, so with overlapped scheduling they see a token one step after it
was sampled; a stop found then drops the token sampled after it, as an EOS does.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.stopping_criteria import StopStringCriteria

from hf_cb.core.sequence import Sequence
from hf_cb.engine.llm_engine import LLMEngine

_NO_TOKEN = 2**62  # left padding of short windows: clamped to the criteria's "matches nothing" row


class StopStrings:
    """``generate(stop_strings=..., tokenizer=...)``: a sequence ends with the first generated
    token that completes one of the strings, as Transformers' `StopStringCriteria` decides it
    (on the last tokens of prompt and output, so a string may begin in the prompt)."""

    def __init__(self, tokenizer: Any, stop_strings: str | list[str]):
        self.criteria = StopStringCriteria(tokenizer, stop_strings)
        self.width = self.criteria.maximum_token_len
        self._checked: dict[int, int] = {}  # generated tokens already checked, per sequence

    def __call__(self, engine: LLMEngine, updated: list[Sequence]) -> None:
        """Finish (reason ``"stop"``) the sequences whose new tokens completed a string."""
        windows, where = [], []
        for seq in updated:
            start, end = self._checked.get(seq.seq_id, 0), seq.num_resolved
            self._checked[seq.seq_id] = end
            base = len(seq.prompt_ids)
            for n in range(start + 1, end + 1):  # each new token, with what came before it
                window = seq.token_ids[max(0, base + n - self.width) : base + n]
                windows.append([_NO_TOKEN] * (self.width - len(window)) + window)
                where.append((seq, n))
        if not windows:
            return
        hits = self.criteria(torch.tensor(windows), None).tolist()
        stopped = set()
        for (seq, n), hit in zip(where, hits):
            if hit and seq.seq_id not in stopped:  # the first completing token ends it
                stopped.add(seq.seq_id)
                engine.finish(seq, "stop", num_generated=n)


class StreamerFeed:
    """Hands one sequence's tokens to a Transformers streamer as `generate` does: the prompt
    first, then each new token as a ``[1]`` tensor, then ``end()``."""

    def __init__(self, streamer: Any, input_ids: torch.Tensor):
        self.streamer = streamer
        self._sent = 0
        streamer.put(input_ids.cpu())

    def __call__(self, engine: LLMEngine, updated: list[Sequence]) -> None:
        for seq in updated:
            tokens = seq.output_ids[self._sent : seq.num_resolved]
            self._sent += len(tokens)
            for token in tokens:
                self.streamer.put(torch.tensor([token]))

    def end(self) -> None:
        self.streamer.end()
