"""The engine that lives on a model between calls, so the page pool is allocated once."""

from __future__ import annotations

import gc

import torch

from hf_cb.core.config import EngineConfig
from hf_cb.engine.llm_engine import LLMEngine

_ENGINE_ATTR = "_hf_cb_engine"


def get_engine(model: torch.nn.Module, engine_config: EngineConfig | None = None) -> LLMEngine:
    """The model's engine, built on first use (or rebuilt for a different config)."""
    engine: LLMEngine | None = getattr(model, _ENGINE_ATTR, None)
    if engine is not None and engine_config is not None and engine_config != engine.requested_config:
        release(model)
        engine = None
    if engine is None:
        engine = LLMEngine(model, engine_config)
        object.__setattr__(model, _ENGINE_ATTR, engine)
    return engine


def release(model: torch.nn.Module) -> None:
    """Free the model's engine and its page pool; the next call builds a new one. An online
    engine stepping it is shut down first."""
    engine: LLMEngine | None = getattr(model, _ENGINE_ATTR, None)
    if engine is not None:
        if engine.owner is not None:
            engine.owner.shutdown()
        engine.release()
        object.__delattr__(model, _ENGINE_ATTR)
        del engine
        gc.collect()  # the engine's parts refer to each other: free the pages now, not later
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def reset_prefix_cache(model: torch.nn.Module) -> None:
    """Forget the prefixes the model's engine has cached. Needed only after writing weights in
    a way the engine cannot see (through ``param.data``); optimizer steps and `load_state_dict`
    are noticed at the next call."""
    engine: LLMEngine | None = getattr(model, _ENGINE_ATTR, None)
    if engine is not None:
        engine.reset_prefix_cache()


def sleep(model: torch.nn.Module) -> None:
    """Free the GPU memory of the model's engine that it can rebuild (the KV page pool and the
    decode CUDA graphs), e.g. for a training step; the next call (or `wake_up`) rebuilds it."""
    engine: LLMEngine | None = getattr(model, _ENGINE_ATTR, None)
    if engine is not None:
        engine.sleep()


def wake_up(model: torch.nn.Module) -> None:
    """Rebuild what `sleep` freed now, rather than at the next call."""
    engine: LLMEngine | None = getattr(model, _ENGINE_ATTR, None)
    if engine is not None:
        engine.wake_up()
