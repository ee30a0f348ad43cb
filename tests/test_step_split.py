"""How a mixed step is split between FlashInfer's decode and prefill kernels (CPU: index math only;
the kernels themselves are checked in test_cuda.py)."""

import random

import numpy as np
import pytest
import torch

from hf_cb.attention.backends.flashinfer_backend import split_parts, step_arrays
from hf_cb.core.config import EngineConfig
from hf_cb.core.scheduler import Scheduler
from hf_cb.core.sequence import Sequence
from hf_cb.manager import PageManager
from hf_cb.sampling.params import SamplingParams

PS = 4


def _table(q_lens, kv_lens, seed=0):
    manager = PageManager(sum(-(-n // PS) for n in kv_lens) + 4, PS, len(kv_lens), 64)
    random.Random(seed).shuffle(manager._free_pages)
    for s, n in enumerate(kv_lens):
        manager.allocate(s, n)
    cached = [k - q for k, q in zip(kv_lens, q_lens)]
    return manager, cached, manager.build(list(range(len(kv_lens))), cached, q_lens)


def _as_tensors(arrays):
    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}


@pytest.mark.parametrize("num_decode", [0, 1, 3, 5])
def test_each_part_sees_exactly_its_rows_metadata(num_decode):
    rng = random.Random(num_decode)
    q_lens = [1] * num_decode + [rng.randint(2, 30) for _ in range(5 - num_decode)]
    kv_lens = [q + rng.randint(0, 40) for q in q_lens]
    manager, cached, table = _table(q_lens, kv_lens)
    found, arrays = step_arrays(table)
    assert found == num_decode
    tensors = _as_tensors(arrays)
    parts = split_parts(table, found, tensors, tensors)
    rows = {True: range(num_decode), False: range(num_decode, 5)}
    assert [p.is_decode for p in parts] == [k for k in (True, False) if len(rows[k])]
    for part in parts:
        r = list(rows[part.is_decode])
        alone = manager.build(r, [cached[i] for i in r], [q_lens[i] for i in r])
        num_pages = int(part.kv_indptr[-1])
        assert part.kv_indptr.tolist() == alone.kv_indptr.tolist()
        assert part.kv_indices[:num_pages].tolist() == alone.kv_indices.tolist()
        assert part.kv_last_page_len.tolist() == alone.kv_last_page_len.tolist()
        if not part.is_decode:
            assert part.qo_indptr.tolist() == alone.qo_indptr.tolist()
        start = table.qo_indptr[r[0]]
        tokens = np.arange(table.num_tokens)[part.tokens]
        assert tokens.tolist() == list(range(start, start + alone.num_tokens))


def test_a_single_token_row_after_a_prompt_stays_in_the_prefill_part():
    _, _, table = _table([1, 7, 1], [5, 7, 9])
    num_decode, arrays = step_arrays(table)
    parts = split_parts(table, num_decode, _as_tensors(arrays), _as_tensors(arrays))
    assert [(p.is_decode, p.tokens) for p in parts] == [(True, slice(0, 1)), (False, slice(1, None))]


def test_scheduler_puts_single_token_rows_first():
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64)
    manager = PageManager(64, PS, 8, 64)
    scheduler = Scheduler(config, manager)
    seqs = [Sequence(i, [3] * n, SamplingParams(4), seed=0) for i, n in enumerate([5, 6])]
    for s in seqs:
        scheduler.add(s)
    first = scheduler.schedule()
    scheduler.on_launch(first)
    scheduler.resolve(first, [7] * len(first.sample_rows))
    for seq_id, n in ((2, 9), (3, 1)):  # a new prompt, then a one-token prompt
        scheduler.add(Sequence(seq_id, [3] * n, SamplingParams(4), seed=0))
    batch = scheduler.schedule()
    assert batch.num_new_tokens == [1, 1, 1, 9]
    assert [s.seq_id for s in batch.seqs] == [0, 1, 3, 2]
