"""The PyTorch attention backend against a dense float64 reference, on CPU."""

import pytest
import torch
from attention_cases import run_case

from hf_cb.attention.backends.torch_backend import TorchAttentionBackend
from hf_cb.paged_cache import PagedCache

PS = 4
STEPS = {
    "prefill": ([7, 1, PS, 2 * PS + 1], [7, 1, PS, 2 * PS + 1]),
    "decode": ([1, 1, 1, 1], [1, PS, PS + 1, 3 * PS - 1]),
    "mixed": ([1, 5, 1, 2 * PS], [9, 5, PS, 5 * PS]),  # decode rows, a prompt, a later chunk
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_torch_backend_matches_dense_reference(step, heads):
    q_lens, kv_lens = STEPS[step]
    backend = TorchAttentionBackend(PS, torch.device("cpu"))
    err = run_case(
        backend, q_lens, kv_lens, num_heads=heads[0], num_kv_heads=heads[1], head_dim=16,
        page_size=PS, dtype=torch.float32, device="cpu",
    )
    assert err < 1e-5


@pytest.mark.parametrize("step", list(STEPS))
def test_sliding_window_and_softcap(step):
    q_lens, kv_lens = STEPS[step]
    backend = TorchAttentionBackend(PS, torch.device("cpu"))
    for window, softcap in [(3, None), (1, None), (None, 5.0), (6, 2.0)]:
        err = run_case(
            backend, q_lens, kv_lens, num_heads=4, num_kv_heads=2, head_dim=16, page_size=PS,
            dtype=torch.float32, device="cpu", sliding_window=window, softcap=softcap, seed=3,
        )
        assert err < 1e-5, (window, softcap)


def test_reference_would_catch_a_wrong_mask():
    """The check has teeth: an off-by-one window gives a large error."""
    q_lens, kv_lens = STEPS["mixed"]

    class OffByOne(TorchAttentionBackend):
        def plan(self, table):
            step = super().plan(table)
            attend = step.attend
            step.attend = lambda *a, sliding_window=None, **k: attend(*a, sliding_window=4, **k)
            return step

    err = run_case(
        OffByOne(PS, torch.device("cpu")), q_lens, kv_lens, num_heads=4, num_kv_heads=2,
        head_dim=16, page_size=PS, dtype=torch.float32, device="cpu", sliding_window=3,
    )
    assert err > 1e-2


def test_hnd_pages_seen_token_major():
    """An HND cache's pages hold each head's tokens contiguously; `token_major` shows them as the
    NHD cache does, and both check the K/V the model produces alike."""
    nhd = PagedCache.uniform(1, 3, PS, 2, 8, torch.float32, torch.device("cpu"))
    hnd = PagedCache.uniform(1, 3, PS, 2, 8, torch.float32, torch.device("cpu"), layout="HND")
    assert hnd.layers[0].keys.shape == (4, 2, PS, 8) and nhd.layers[0].keys.shape == (4, PS, 2, 8)
    hnd.token_major(hnd.layers[0].keys)[1, 2] = torch.arange(16.0).view(2, 8)
    assert torch.equal(hnd.layers[0].keys[1, :, 2], torch.arange(16.0).view(2, 8))
    assert hnd.layers[0].get_max_length() == nhd.layers[0].get_max_length() == 3 * PS
    with pytest.raises(ValueError, match="K/V of 3 heads x 8 and 3 heads x 8, the paged cache holds 2 x 8 and 2 x 8"):
        hnd.layers[0].update(torch.zeros(1, 3, 1, 8), torch.zeros(1, 3, 1, 8))
    with pytest.raises(ValueError, match="unknown KV layout"):
        PagedCache.uniform(1, 3, PS, 2, 8, torch.float32, torch.device("cpu"), layout="NDH")


def test_decode_graphs_split_the_kv_only_where_rows_leave_sms_idle():
    from hf_cb.attention.backends.flashinfer_backend import graph_split_kv

    # llama-1b (8 KV heads) on an H200 (132 SMs): 16 rows give 128 CTAs, fewer than the SMs;
    # 32 rows (W2) give 256 and run unsplit, without the merge kernel.
    assert graph_split_kv(16, 8, 132)
    assert not graph_split_kv(32, 8, 132)
    assert not graph_split_kv(256, 8, 132)
    assert graph_split_kv(64, 2, 132)  # two KV heads: 128 CTAs
    assert graph_split_kv(256, 8, 132, requested=True) and not graph_split_kv(2, 8, 132, requested=False)
