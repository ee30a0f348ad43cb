"""The engine: a page pool, a scheduler and a model runner around one model.

It lives on the model between calls (`get_engine`), so the page pool is allocated once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from itertools import count

import torch
from tqdm.auto import tqdm

from .attention_interface import ATTENTION_NAME, register
from .config import EngineConfig
from .manager import PageManager
from .model_runner import ModelRunner
from .paged_cache import PagedCache
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .torch_backend import TorchAttentionBackend

logger = logging.getLogger("hf_cb")

_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


class ModelNotSupported(ValueError):
    """The model cannot run on hf_cb; the message says why."""


def layer_windows(model: torch.nn.Module) -> list[int | None]:
    """Each layer's sliding window (None: full attention). Refuses layers hf_cb cannot serve."""
    config = model.config.get_text_config(decoder=True)
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ModelNotSupported(f"{name} is an encoder-decoder model; hf_cb serves decoder-only LMs")
    if not model.is_backend_compatible():
        raise ModelNotSupported(
            f"{name} does not route attention through transformers' AttentionInterface"
        )
    if any(hasattr(m, "sinks") for m in model.modules()):
        raise ModelNotSupported(f"{name} uses attention sinks, which hf_cb does not support")
    num_layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is None:
        return [window] * num_layers
    unsupported = sorted(set(layer_types) - _ATTENTION_LAYER_TYPES)
    if unsupported:
        raise ModelNotSupported(
            f"{name} has layers of type {unsupported}, which do not attend through the attention "
            "interface; hf_cb serves full and sliding-window attention layers"
        )
    return [window if t == "sliding_attention" else None for t in layer_types[:num_layers]]


def kv_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head size) from the model's text config."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class LLMEngine:
    """Continuous batching over a paged KV cache for one Transformers causal LM."""

    def __init__(self, model: torch.nn.Module, config: EngineConfig | None = None):
        register()
        self.config = config = config or EngineConfig()
        self.model = model
        windows = layer_windows(model)
        num_layers, kv_heads, head_dim = kv_shape(model)
        text_config = model.config.get_text_config(decoder=True)
        self.max_model_len = config.max_model_len or text_config.max_position_embeddings
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.device = model.device
        dtype = model.dtype

        self._original_attn = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)

        num_pages = config.num_pages or self._default_num_pages(num_layers, kv_heads, head_dim, dtype)
        self.cache = PagedCache(
            num_layers, num_pages, config.page_size, kv_heads, head_dim, dtype, self.device,
            sliding_layers=[w is not None for w in windows],
        )
        self.manager = PageManager(
            num_pages, config.page_size, config.max_num_seqs, -(-self.max_model_len // config.page_size)
        )
        self.scheduler = Scheduler(config, self.manager)
        backend = TorchAttentionBackend(config.page_size, self.device)
        self.runner = ModelRunner(model, self.cache, self.manager, backend)
        self._seq_ids = count()
        self.num_generated_tokens = 0
        logger.info(
            "hf_cb: %d pages of %d tokens (%d tokens of KV cache)",
            num_pages, config.page_size, num_pages * config.page_size,
        )

    def _default_num_pages(self, num_layers, kv_heads, head_dim, dtype) -> int:
        per_page = PagedCache.bytes_per_page(num_layers, self.config.page_size, kv_heads, head_dim, dtype)
        return max(1, min(self.config.cpu_max_pages, self.config.cpu_kv_cache_bytes // per_page))

    # -- requests ----------------------------------------------------------------------------

    def check_request(self, index: int, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise a ValueError naming the problem if the request can never run."""
        if len(prompt_ids) == 0:
            raise ValueError(f"prompt {index} is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt {index} has token id {bad[0]} outside the vocabulary (size {self.vocab_size})"
            )
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt {index} has {len(prompt_ids)} tokens and asks for {params.max_new_tokens} "
                f"new tokens: {total} exceeds the model's context of {self.max_model_len}"
            )
        pages = -(-total // self.config.page_size)
        if pages > self.manager.num_pages:
            raise ValueError(
                f"prompt {index} needs {pages} pages ({total} tokens) but the page pool has "
                f"{self.manager.num_pages}; raise EngineConfig.num_pages"
            )

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams, seed: int, index: int = 0) -> Sequence:
        self.check_request(index, prompt_ids, params)
        seq = Sequence(next(self._seq_ids), list(prompt_ids), params, seed, index)
        self.scheduler.add(seq)
        return seq

    # -- running -----------------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """Schedule and run one step; return the sequences it finished."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            raise RuntimeError("hf_cb: no request could be scheduled (page pool too small?)")
        tokens = self.runner.run(batch)
        self.num_generated_tokens += sum(t is not None for t in tokens)
        return self.scheduler.postprocess(batch, tokens)

    def run(self, seqs: list[Sequence], progress: bool = False) -> None:
        """Step until every queued sequence is done. On any error (Ctrl-C included) the queue
        is dropped and its pages freed, so the engine stays usable."""
        bar = tqdm(total=len(seqs), disable=not progress, unit="req", desc="hf_cb")
        start, generated_before = time.perf_counter(), self.num_generated_tokens
        try:
            while self.scheduler.has_unfinished():
                finished = self.step()
                if finished:
                    rate = (self.num_generated_tokens - generated_before) / (time.perf_counter() - start)
                    bar.set_postfix(tok_s=f"{rate:.0f}", refresh=False)
                    bar.update(len(finished))
        except BaseException:
            self.scheduler.abort_all()
            raise
        finally:
            bar.close()

    def release(self) -> None:
        """Give the model back its attention implementation; drop the pages."""
        self.scheduler.abort_all()
        self.model.set_attn_implementation(self._original_attn)
        self.cache.layers.clear()
