"""The page manager: a fixed pool of KV pages, a block table per sequence, reference counts, and
each step's page metadata in the CSR form FlashInfer takes.

Host-side only (numpy). The pages themselves live in `PagedCache`; here a page is an index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hf_cb.core.prefix_cache import PrefixCache


class OutOfPages(RuntimeError):
    """Raised when an allocation needs more free pages than the pool has."""


@dataclass
class PageTable:
    """One step's page metadata, in FlashInfer's CSR layout (row ``b`` is the step's ``b``-th
    sequence, ``T`` the step's new tokens).

    Attributes:
        qo_indptr: ``[B+1]`` int32, new tokens of row b are ``qo_indptr[b]:qo_indptr[b+1]``.
        kv_indptr: ``[B+1]`` int32, pages of row b are ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``.
        kv_indices: ``[kv_indptr[-1]]`` int32 page ids.
        kv_last_page_len: ``[B]`` int32, tokens in each row's last page, in ``1..page_size``.
        kv_lens: ``[B]`` int32, tokens in each row's cache after this step.
        token_rows: ``[T]`` int32, the row of each new token.
        positions: ``[T]`` int64, the position of each new token in its sequence.
        slot_mapping: ``[T]`` int64, ``page * page_size + offset`` where each new token's K/V go.
    """

    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    kv_indices: np.ndarray
    kv_last_page_len: np.ndarray
    kv_lens: np.ndarray
    token_rows: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.kv_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.positions)


class PageManager:
    """Hands out pages from a fixed pool and keeps each sequence's block table.

    A sequence owns a row of the 2-D block table while it holds pages; full pages are shared
    between sequences through reference counts (`fork`, and prefix-cache hits), so a page
    returns to the pool only when its last holder frees it. With ``prefix_caching`` a freed page
    that holds a cached prefix stays cached until its memory is needed (`prefix_cache`).
    """

    def __init__(self, num_pages: int, page_size: int, max_seqs: int, max_pages_per_seq: int,
                 prefix_caching: bool = False):
        if num_pages < 1 or page_size < 1 or max_seqs < 1 or max_pages_per_seq < 1:
            raise ValueError("num_pages, page_size, max_seqs and max_pages_per_seq must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        # Stacks: pop() hands out the lowest index first, which keeps small tests readable.
        self._free_pages: list[int] = list(range(num_pages - 1, -1, -1))
        self._free_rows: list[int] = list(range(max_seqs - 1, -1, -1))
        self.ref_counts = np.zeros(num_pages, dtype=np.int32)
        self.block_table = np.zeros((max_seqs, max_pages_per_seq), dtype=np.int32)
        self.num_seq_pages = [0] * max_seqs  # a list: read one row at a time, cheaply
        self._rows: dict[int, int] = {}
        self.prefix_cache = PrefixCache() if prefix_caching else None

    # -- bookkeeping -------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        """Pages nobody holds: free ones and evictable cached ones."""
        cached = len(self.prefix_cache.evictable) if self.prefix_cache is not None else 0
        return len(self._free_pages) + cached

    @property
    def num_free_rows(self) -> int:
        """Block-table rows (recurrent-state slots) no sequence holds."""
        return len(self._free_rows)

    def has(self, seq_id: int) -> bool:
        return seq_id in self._rows

    def row_of(self, seq_id: int) -> int:
        """The sequence's row of the block table, which is also its recurrent-state slot: taken
        with its first pages, given back when it frees them."""
        return self._rows[seq_id]

    def pages_of(self, seq_id: int) -> np.ndarray:
        """The block table of a sequence (a copy)."""
        row = self._rows.get(seq_id)
        if row is None:
            return np.zeros(0, dtype=np.int32)
        return self.block_table[row, : self.num_seq_pages[row]].copy()

    def pages_needed(self, seq_id: int, num_tokens: int) -> int:
        """Pages to add so that the sequence can hold ``num_tokens`` tokens."""
        row = self._rows.get(seq_id)
        have = 0 if row is None else self.num_seq_pages[row]
        return max(0, -(-num_tokens // self.page_size) - have)

    def can_allocate(self, seq_id: int, num_tokens: int, prefix: list[int] = ()) -> bool:
        """Whether `allocate` with the same arguments would succeed."""
        needed = self.pages_needed(seq_id, num_tokens) - len(prefix)
        free = self.num_free_pages
        if prefix:  # cached pages nobody holds count as free until the prefix takes them
            free -= sum(p in self.prefix_cache.evictable for p in prefix)
        return needed <= free and (needed + len(prefix) == 0 or self._has_row(seq_id))

    def _has_row(self, seq_id: int) -> bool:
        return seq_id in self._rows or bool(self._free_rows)

    # -- allocation --------------------------------------------------------------------------

    def allocate(self, seq_id: int, num_tokens: int, prefix: list[int] = ()) -> None:
        """Grow the sequence's block table to hold ``num_tokens`` tokens (all or nothing). A new
        sequence may start from ``prefix``: cached pages (`match`) it then shares."""
        total_pages = -(-num_tokens // self.page_size)
        if total_pages > self.max_pages_per_seq:
            raise ValueError(
                f"sequence {seq_id} needs {total_pages} pages for {num_tokens} tokens; "
                f"the block table holds {self.max_pages_per_seq}"
            )
        if not self.can_allocate(seq_id, num_tokens, prefix):
            raise OutOfPages(f"sequence {seq_id} needs {self.pages_needed(seq_id, num_tokens) - len(prefix)} pages, "
                             f"{self.num_free_pages} are free")
        if prefix:
            self._share_prefix(seq_id, prefix)
        needed = self.pages_needed(seq_id, num_tokens)
        if needed == 0:
            return
        row = self._row_for(seq_id)
        start = self.num_seq_pages[row]
        pages = [self._take_page() for _ in range(needed)]
        self.block_table[row, start : start + needed] = pages
        self.num_seq_pages[row] = start + needed
        self.ref_counts[pages] = 1

    def _share_prefix(self, seq_id: int, prefix: list[int]) -> None:
        if seq_id in self._rows:
            raise ValueError(f"sequence {seq_id} already holds pages; a cached prefix starts a sequence")
        row = self._row_for(seq_id)
        for page in prefix:
            self.prefix_cache.acquire(page)
        self.block_table[row, : len(prefix)] = prefix
        self.num_seq_pages[row] = len(prefix)
        self.ref_counts[prefix] += 1

    def _take_page(self) -> int:
        """A free page, else the least recently freed cached one (evicted)."""
        if self._free_pages:
            return self._free_pages.pop()
        return self.prefix_cache.evict()

    def _row_for(self, seq_id: int) -> int:
        row = self._rows.get(seq_id)
        if row is None:
            if not self._free_rows:
                raise OutOfPages("every block-table row is in use")
            row = self._rows[seq_id] = self._free_rows.pop()
        return row

    def fork(self, src_id: int, dst_id: int, num_tokens: int) -> None:
        """Let a new sequence share the full pages holding ``src``'s first ``num_tokens`` tokens."""
        if dst_id in self._rows:
            raise ValueError(f"sequence {dst_id} already holds pages")
        src_row = self._rows[src_id]
        num_shared = min(num_tokens // self.page_size, self.num_seq_pages[src_row])
        if num_shared == 0:
            return
        pages = self.block_table[src_row, :num_shared]
        row = self._row_for(dst_id)
        self.block_table[row, :num_shared] = pages
        self.num_seq_pages[row] = num_shared
        self.ref_counts[pages] += 1

    def free(self, seq_id: int) -> None:
        """Drop the sequence's pages; pages nobody else holds go back to the pool (cached ones
        stay cached, the last page of the sequence first in line for eviction)."""
        row = self._rows.pop(seq_id, None)
        if row is None:
            return
        pages = self.block_table[row, : self.num_seq_pages[row]]
        self.ref_counts[pages] -= 1
        cache = self.prefix_cache
        for p in pages[::-1].tolist():
            if self.ref_counts[p] == 0 and (cache is None or not cache.release(p)):
                self._free_pages.append(p)
        self.num_seq_pages[row] = 0
        self._free_rows.append(row)

    # -- prefix caching ----------------------------------------------------------------------

    def match(self, hashes: list[bytes]) -> list[int]:
        """The cached pages of the longest prefix of ``hashes`` (`prefix_cache.page_hashes`)."""
        return self.prefix_cache.lookup(hashes) if self.prefix_cache is not None else []

    def register(self, seq_id: int, hashes: list[bytes], start: int) -> None:
        """Cache the sequence's pages ``start .. len(hashes) - 1``, full and computed, under
        ``hashes`` (a prefix another page holds already stays with that page)."""
        if self.prefix_cache is None:
            return
        row = self._rows[seq_id]
        for i in range(start, len(hashes)):
            self.prefix_cache.register(int(self.block_table[row, i]), hashes[i])

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (pages computed with other weights, say)."""
        if self.prefix_cache is not None:
            self._free_pages.extend(self.prefix_cache.reset())

    # -- step metadata -----------------------------------------------------------------------

    def build(self, seq_ids: list[int], num_cached: np.ndarray, num_new: np.ndarray) -> PageTable:
        """Page metadata of a step in which row ``b`` adds ``num_new[b]`` tokens after
        ``num_cached[b]`` cached ones. Pages must already be allocated."""
        ps = self.page_size
        num_cached = np.asarray(num_cached, dtype=np.int64)
        num_new = np.asarray(num_new, dtype=np.int64)
        rows = np.fromiter((self._rows[s] for s in seq_ids), dtype=np.int64, count=len(seq_ids))
        kv_lens = num_cached + num_new
        num_kv_pages = -(-kv_lens // ps)
        if np.any(num_kv_pages > np.array(self.num_seq_pages)[rows]):
            raise RuntimeError("PageManager.build: a row has fewer pages allocated than tokens")

        qo_indptr = _indptr(num_new)
        kv_indptr = _indptr(num_kv_pages)
        width = int(num_kv_pages.max(initial=0))
        table = self.block_table[rows, :width]
        kv_indices = table[np.arange(width) < num_kv_pages[:, None]]

        token_rows = np.repeat(np.arange(len(rows)), num_new)
        positions = np.arange(qo_indptr[-1]) - qo_indptr[token_rows] + num_cached[token_rows]
        slot_mapping = table[token_rows, positions // ps].astype(np.int64) * ps + positions % ps
        return PageTable(
            qo_indptr=qo_indptr.astype(np.int32),
            kv_indptr=kv_indptr.astype(np.int32),
            kv_indices=kv_indices.astype(np.int32),
            kv_last_page_len=((kv_lens - 1) % ps + 1).astype(np.int32),
            kv_lens=kv_lens.astype(np.int32),
            token_rows=token_rows.astype(np.int32),
            positions=positions.astype(np.int64),
            slot_mapping=slot_mapping,
        )


def _indptr(counts: np.ndarray) -> np.ndarray:
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr
