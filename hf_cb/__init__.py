"""hf_cb: continuous batching over a paged KV cache for Hugging Face Transformers causal LMs.

``import hf_cb`` registers the attention function ``"hf_cb"`` (and its mask function) with
Transformers and adds ``generate_batch_continuous`` to every generative model. The names below
are the public API; `docs/architecture.md` maps the subpackages.
"""

from hf_cb.attention_interface import ATTENTION_NAME, register
from hf_cb.core.config import EngineConfig
from hf_cb.core.sequence import Completion, TokenLogprob
from hf_cb.engine.llm_engine import LLMEngine
from hf_cb.engine.on_model import get_engine, release, reset_prefix_cache, sleep, wake_up
from hf_cb.entrypoints.data_parallel import generate_data_parallel
from hf_cb.entrypoints.model_loader import load_model
from hf_cb.entrypoints.online import OnlineEngine
from hf_cb.generation_mixin import disable, enable, generate, generate_batch_continuous, install
from hf_cb.model_support.shape import ModelNotSupported
from hf_cb.paged_cache import PagedCache
from hf_cb.sampling.params import SamplingParams

register()
install()

__all__ = [
    "ATTENTION_NAME",
    "Completion",
    "EngineConfig",
    "LLMEngine",
    "ModelNotSupported",
    "OnlineEngine",
    "PagedCache",
    "SamplingParams",
    "TokenLogprob",
    "disable",
    "enable",
    "generate",
    "generate_batch_continuous",
    "generate_data_parallel",
    "get_engine",
    "load_model",
    "release",
    "reset_prefix_cache",
    "sleep",
    "wake_up",
]
