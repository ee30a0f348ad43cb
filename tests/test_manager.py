"""The page manager on CPU: allocation, freeing, sharing and each step's CSR metadata."""

import random

import numpy as np
import pytest

from hf_cb.manager import OutOfPages, PageManager

PS = 4


def make(num_pages=16, max_seqs=8, max_pages=16):
    return PageManager(num_pages, PS, max_seqs, max_pages)


def brute_force(manager, seq_ids, cached, new):
    """Metadata built token by token from each block table."""
    qo, kv, indices, last, slots, positions, rows = [0], [0], [], [], [], [], []
    for row, (s, c, n) in enumerate(zip(seq_ids, cached, new)):
        table = list(manager.pages_of(s))
        length = c + n
        pages = table[: (length + PS - 1) // PS]
        qo.append(qo[-1] + n)
        kv.append(kv[-1] + len(pages))
        indices += pages
        last.append(length - (len(pages) - 1) * PS)
        for pos in range(c, length):
            positions.append(pos)
            slots.append(table[pos // PS] * PS + pos % PS)
            rows.append(row)
    return qo, kv, indices, last, slots, positions, rows


@pytest.mark.parametrize("length", [1, PS - 1, PS, PS + 1, 2 * PS, 2 * PS + PS - 1])
def test_append_across_page_boundaries(length):
    m = make()
    m.allocate(7, length)
    assert len(m.pages_of(7)) == -(-length // PS)
    # Growing one token at a time adds a page exactly when the last one is full.
    for extra in range(1, 2 * PS + 1):
        before = len(m.pages_of(7))
        m.allocate(7, length + extra)
        grew = len(m.pages_of(7)) - before
        assert grew == (1 if (length + extra - 1) % PS == 0 else 0)
    t = m.build([7], [length], [1])
    assert t.kv_last_page_len.tolist() == [(length + 1) % PS or PS]


@pytest.mark.parametrize("kv_len", [PS - 1, PS, PS + 1, 3 * PS])
def test_last_page_len_is_never_zero(kv_len):
    m = make()
    m.allocate(0, kv_len)
    t = m.build([0], [kv_len - 1], [1])
    expected = kv_len % PS or PS
    assert t.kv_last_page_len.tolist() == [expected]
    assert t.kv_lens.tolist() == [kv_len]


def test_free_and_reuse():
    m = make(num_pages=6)
    m.allocate(1, 3 * PS)
    m.allocate(2, 3 * PS)
    assert m.num_free_pages == 0
    first = set(m.pages_of(1))
    m.free(1)
    assert m.num_free_pages == 3
    m.allocate(3, 2 * PS + 1)
    assert set(m.pages_of(3)) == first
    m.free(2)
    m.free(3)
    assert m.num_free_pages == 6 and not m.ref_counts.any()


def test_exhaustion_is_all_or_nothing():
    m = make(num_pages=4)
    m.allocate(1, 3 * PS)
    with pytest.raises(OutOfPages):
        m.allocate(2, 2 * PS)
    assert m.num_free_pages == 1 and not m.has(2)
    assert not m.can_allocate(2, 2 * PS) and m.can_allocate(2, PS)
    with pytest.raises(ValueError, match="block table"):
        make(max_pages=2).allocate(9, 3 * PS)


def test_fork_shares_full_pages_by_reference():
    m = make(num_pages=8)
    m.allocate(1, 2 * PS + 2)
    m.fork(1, 2, 2 * PS + 2)
    shared = m.pages_of(2)
    assert list(shared) == list(m.pages_of(1))[:2]
    assert (m.ref_counts[shared] == 2).all()
    m.allocate(2, 2 * PS + 2)  # the partial page is private to the fork
    assert m.pages_of(2)[2] != m.pages_of(1)[2]
    m.free(1)
    assert (m.ref_counts[shared] == 1).all() and m.num_free_pages == 8 - 3
    m.free(2)
    assert m.num_free_pages == 8


def test_metadata_matches_brute_force_with_scattered_pages():
    rng = random.Random(0)
    m = make(num_pages=64, max_seqs=8, max_pages=16)
    # Interleave allocations and frees so block tables are scattered over the pool.
    for s in range(8):
        m.allocate(s, rng.randint(1, 6 * PS))
    for s in (1, 4, 6):
        m.free(s)
    ids, cached, new = [], [], []
    for s in (0, 2, 3, 5, 7, 10, 11):
        c = rng.choice([0, 0, rng.randint(0, 5 * PS)])
        n = rng.choice([1, rng.randint(1, 3 * PS)])
        m.allocate(s, c + n)
        ids.append(s), cached.append(c), new.append(n)
    t = m.build(ids, cached, new)
    qo, kv, indices, last, slots, positions, rows = brute_force(m, ids, cached, new)
    assert t.qo_indptr.tolist() == qo
    assert t.kv_indptr.tolist() == kv
    assert t.kv_indices.tolist() == indices
    assert t.kv_last_page_len.tolist() == last
    assert t.slot_mapping.tolist() == slots
    assert t.positions.tolist() == positions
    assert t.token_rows.tolist() == rows
    assert t.qo_indptr.dtype == t.kv_indptr.dtype == t.kv_indices.dtype == np.int32


def test_build_refuses_unallocated_tokens():
    m = make()
    m.allocate(0, PS)
    with pytest.raises(RuntimeError, match="fewer pages"):
        m.build([0], [PS], [1])


def test_random_operations_never_lose_or_double_book_a_page():
    rng = random.Random(1)
    m = make(num_pages=40, max_seqs=10, max_pages=40)
    lengths: dict[int, int] = {}
    next_id = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.45 and len(lengths) < 10:
            want = rng.randint(1, 12 * PS)
            if m.can_allocate(next_id, want):
                m.allocate(next_id, want)
                lengths[next_id] = want
            else:
                with pytest.raises(OutOfPages):
                    m.allocate(next_id, want)
            next_id += 1
        elif op < 0.8 and lengths:
            s = rng.choice(list(lengths))
            want = lengths[s] + rng.randint(1, 2 * PS)
            if m.can_allocate(s, want):
                m.allocate(s, want)
                lengths[s] = want
        elif op < 0.9 and lengths and len(lengths) < 10:
            src = rng.choice(list(lengths))
            m.fork(src, next_id, lengths[src])
            lengths[next_id] = (lengths[src] // PS) * PS
            if lengths[next_id] == 0:
                del lengths[next_id]
            next_id += 1
        elif lengths:
            s = rng.choice(list(lengths))
            m.free(s)
            del lengths[s]
        # Invariants: every page is free or held, reference counts equal the holders.
        held = np.zeros(m.num_pages, dtype=np.int64)
        for s, length in lengths.items():
            pages = m.pages_of(s)
            assert len(pages) >= -(-length // PS)
            held[pages] += 1
        free = m._free_pages
        assert len(free) == len(set(free)) == m.num_free_pages
        assert (held[free] == 0).all()
        assert (held == m.ref_counts).all()
        assert m.num_free_pages + int((held > 0).sum()) == m.num_pages
