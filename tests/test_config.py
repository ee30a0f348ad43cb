"""EngineConfig: what ``None`` leaves to the device, and when an engine is reused."""

import pytest
import torch
from conftest import tiny_model

import hf_cb
from hf_cb.core.config import default_max_num_seqs

GiB = 1 << 30


@pytest.mark.parametrize(
    "device_type, memory, rows",
    [("cuda", 141 * GiB, 1024), ("cuda", 80 * GiB, 1024), ("cuda", 70 * GiB, 1024), ("cuda", 48 * GiB, 256),
     ("cuda", 24 * GiB, 256), ("cpu", 1024 * GiB, 256)],
)
def test_default_max_num_seqs_follows_vllm(device_type, memory, rows):
    assert default_max_num_seqs(device_type, memory) == rows


def test_engine_fills_in_max_num_seqs_and_is_reused_for_the_same_request():
    model = tiny_model("llama")
    engine = hf_cb.get_engine(model, hf_cb.EngineConfig())
    assert engine.config.max_num_seqs == 256 and engine.scheduler.max_num_seqs == 256  # CPU
    assert engine.requested_config.max_num_seqs is None
    assert hf_cb.get_engine(model, hf_cb.EngineConfig()) is engine  # the same request: no rebuild
    assert hf_cb.get_engine(model, hf_cb.EngineConfig(max_num_seqs=8)).config.max_num_seqs == 8


def test_explicit_max_num_seqs_is_kept_and_checked():
    assert hf_cb.EngineConfig(max_num_seqs=3).resolved(torch.device("cpu")).max_num_seqs == 3
    with pytest.raises(ValueError, match="EngineConfig.max_num_seqs must be >= 1, got 0"):
        hf_cb.EngineConfig(max_num_seqs=0)
