"""Text of generated tokens as they arrive, and OpenAI-style stop strings.

Fast tokenizers decode through their own streaming decoder (`tokenizers.decoders.DecodeStream`),
which emits a character only once all of its bytes have arrived: a Chinese character or an
emoji split across tokens never surfaces as U+FFFD, and the pieces concatenate to the full
decode. Other tokenizers decode a sliding window of ids and hold back text that still ends in
U+FFFD (the method of TGI and vLLM).

When the sequence ends inside a character (its last bytes never came), the final text is the
tokenizer's plain decode of every token, U+FFFD included, as `tokenizer.decode` and
Transformers' `generate` give it.

Stop strings follow the OpenAI API: generation ends at the first occurrence of any of them in
the generated text, which is cut before it (after it with ``include_stop``). While streaming,
the last ``len(longest stop) - 1`` characters are held back, since they may begin a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"


class _WindowDecoder:
    """Incremental decoding for tokenizers without a streaming decoder."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def step(self, token_id: int) -> str | None:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT):
            return None
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]


class IncrementalDetokenizer:
    """Feed a sequence's generated tokens with `add`; read the new text with `delta`."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop: bool = False, min_tokens: int = 0):
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            self._step = lambda token_id: stream.step(backend, token_id)
        else:
            self._step = _WindowDecoder(tokenizer, skip_special_tokens).step
        self.stop = tuple(s for s in stop if s)
        self.include_stop = include_stop
        self.min_tokens = min_tokens  # stop strings count only from here on (vLLM's min_tokens)
        self._hold = max(map(len, self.stop), default=1) - 1
        self.text = ""
        self.num_tokens = 0  # tokens consumed (up to and including the one completing a stop string)
        self.stopped_on: str | None = None
        self._sent = 0

    def add(self, token_ids: Sequence[int]) -> bool:
        """Consume tokens in order; True once a stop string has matched. Tokens after the one
        that completed it are not consumed: ``num_tokens`` says how many were."""
        for token_id in token_ids:
            if self.stopped_on is not None:
                return True
            piece = self._step(token_id)
            self._ids.append(token_id)
            self.num_tokens += 1
            if piece:
                start = len(self.text)
                self.text += piece
                if self.stop and self.num_tokens >= self.min_tokens:
                    self._find_stop(start)
        return self.stopped_on is not None

    def _find_stop(self, start: int) -> None:
        """Look for a stop string that ends in the text added at ``start``."""
        window_start = max(0, start - self._hold)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, window_start)) >= 0]
        if hits:
            pos, stop = min(hits)
            self.text = self.text[: pos + len(stop) if self.include_stop else pos]
            self.stopped_on = stop

    def delta(self, final: bool = False) -> str:
        """Text not returned before. Until ``final`` (or a stop), the tail that could begin a
        stop string is held back."""
        if final and self.stopped_on is None:
            self._flush()
        end = len(self.text)
        if not final and self.stopped_on is None:
            end = max(self._sent, end - self._hold)
        piece, self._sent = self.text[self._sent : end], end
        return piece

    def _flush(self) -> None:
        """At the end: the bytes of a character that never completed, as the plain decode
        shows them (U+FFFD)."""
        full = self._decode(self._ids)
        if len(full) > len(self.text) and full.startswith(self.text):
            self.text = full
