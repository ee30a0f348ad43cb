"""Prefix caching: full KV pages found again by the tokens they hold and every token before them.

A full page is keyed by a hash chained over the pages before it (`page_hashes`), so one key
names one whole prefix, as in vLLM and nano-vllm. The hash is BLAKE2b, not Python's ``hash()``
(salted per process), so keys mean the same in every process. A cached page whose last holder
frees it stays cached, unreferenced, until its memory is needed; then the least recently freed
is evicted first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def page_hashes(token_ids: Sequence[int], page_size: int, known: list[bytes], num_pages: int) -> list[bytes]:
    """The chained hashes of the first ``num_pages`` full pages of ``token_ids``; ``known``
    holds those of a prefix already hashed (extended in place and returned)."""
    if num_pages <= len(known):
        return known
    start = len(known) * page_size
    data = np.asarray(token_ids[start : num_pages * page_size], dtype=np.int64).tobytes()
    step = page_size * 8
    prev = known[-1] if known else b""
    for offset in range(0, len(data), step):
        prev = hashlib.blake2b(prev + data[offset : offset + step], digest_size=16).digest()
        known.append(prev)
    return known


class PrefixCache:
    """Which pages hold which prefixes, and which cached pages nobody holds (evictable)."""

    def __init__(self) -> None:
        self.page_of: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, reference count 0; oldest first
        self.num_evictions = 0

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The pages of the longest cached prefix of ``hashes``."""
        pages = []
        for h in hashes:
            page = self.page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def register(self, page: int, h: bytes) -> None:
        """Cache ``page`` as holding the prefix ``h`` (a page already cached, or a prefix
        already held by another page, stays as it is)."""
        if h not in self.page_of and page not in self.hash_of:
            self.page_of[h] = page
            self.hash_of[page] = h

    def acquire(self, page: int) -> None:
        """A cached page gets a holder: it is no longer evictable."""
        self.evictable.pop(page, None)

    def release(self, page: int) -> bool:
        """A page lost its last holder; True if it stays cached (evictable)."""
        if page in self.hash_of:
            self.evictable[page] = None
            return True
        return False

    def evict(self) -> int:
        """Forget the least recently freed cached page and return it."""
        page, _ = self.evictable.popitem(last=False)
        self.num_evictions += 1
        del self.page_of[self.hash_of.pop(page)]
        return page

    def reset(self) -> list[int]:
        """Forget every cached prefix; return the pages that were evictable (now free)."""
        freed = list(self.evictable)
        self.page_of.clear()
        self.hash_of.clear()
        self.evictable.clear()
        return freed
