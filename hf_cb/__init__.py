"""hf_cb: continuous batching over a paged KV cache for Hugging Face Transformers causal LMs.

``import hf_cb`` registers the attention function ``"hf_cb"`` (and its mask function) with
Transformers and adds ``generate_batch_continuous`` to every generative model.
"""

from .attention_interface import ATTENTION_NAME, register
from .config import EngineConfig
from .data_parallel import generate_data_parallel
from .engine import LLMEngine
from .generation_mixin import disable, enable, generate, generate_batch_continuous, install
from .model_engine import get_engine, release, reset_prefix_cache, sleep, wake_up
from .model_support import ModelNotSupported
from .paged_cache import PagedCache
from .sampling import SamplingParams
from .sequence import Completion

register()
install()

__all__ = [
    "ATTENTION_NAME",
    "Completion",
    "EngineConfig",
    "LLMEngine",
    "ModelNotSupported",
    "PagedCache",
    "SamplingParams",
    "disable",
    "enable",
    "generate",
    "generate_batch_continuous",
    "generate_data_parallel",
    "get_engine",
    "release",
    "reset_prefix_cache",
    "sleep",
    "wake_up",
]
