"""Tiny random models and prompts shared by the tests (no weights are downloaded)."""

from __future__ import annotations

import logging
import os
import random
import time
import weakref
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

import hf_cb

pytest_plugins = ["server_support"]  # the server tests' fixtures (one server per test module)

VOCAB = 512
# HF_CB_TEST_DEVICE=cuda runs the CPU suite on a GPU (float32 models: the PyTorch backend).
DEVICE = os.environ.get("HF_CB_TEST_DEVICE", "cpu")
_models: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    # Larger weights spread the logits, so float32 rounding never flips a greedy choice.
    initializer_range=0.2,
)

MODEL_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=48),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=32),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=16),
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=16, sliding_window=32, attn_logit_softcapping=20.0),
    "gemma3": lambda: Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=32, layer_types=["sliding_attention", "full_attention"]),
}


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = DEVICE):
    return model_from_config(MODEL_CONFIGS[name](), seed, dtype, device)


def model_from_config(config, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = DEVICE):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    _models.add(model)
    return model


def keep_engine(model):
    """Exempt ``model`` from the per-test engine release below: a module-scoped server steps it
    across tests (its fixture releases it)."""
    _models.discard(model)
    return model


@pytest.fixture(autouse=True)
def _release_engines():
    """Each test starts without engines (on CUDA each would hold most of the free memory)."""
    yield
    for model in list(_models):
        hf_cb.release(model)


def saved_model(model, tokenizer, folder):
    """``model`` and ``tokenizer`` saved into ``folder`` (a model directory for the CLI)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_prompts(n: int, min_len: int, max_len: int, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    """Prompts of token ids >= 3, so no prompt holds BOS/EOS/PAD."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def reference_generate(model, prompt: list[int], **kwargs) -> list[int]:
    """Stock `generate` on one unpadded prompt; returns the new tokens."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out[0, len(prompt) :].tolist()


def word_tokenizer(vocab_size: int = VOCAB):
    """A word-level fast tokenizer over ``w3 .. w{vocab_size-1}`` plus <pad>/<s>/</s> (ids 0-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


# Each message's words, then "w3" as the assistant's cue.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w3{% endif %}"


def chat_word_tokenizer(vocab_size: int = VOCAB):
    """`word_tokenizer` with a chat template, for the chat routes."""
    tokenizer = word_tokenizer(vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def byte_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE fast tokenizer (as GPT-2 or Llama 3) trained on a little English, so
    Chinese characters and emoji split into byte tokens. Ids 0-2 are <pad>/<s>/</s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, the capital of France is Paris"] * 50
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


# -- the embedded default model (test_model_loader, test_cli) ----------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chat_ids(tokenizer) -> torch.Tensor:
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Fetch and convert the default model into a fresh cache, once per session (``cache``:
    the folder to point ``$HF_CB_CACHE`` at). The GGUF is loaded only once: a spy on
    ``load_model`` keeps what the conversion loaded (through the ``.gguf`` path branch) and its
    logits, the reference the converted folder must match exactly."""
    from hf_cb.entrypoints import model_loader

    cache = tmp_path_factory.mktemp("hf_cb_cache")
    calls, records = [], []
    real_load = model_loader.load_model

    def spy(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        with torch.no_grad():
            logits = loaded.model(chat_ids(loaded.tokenizer)).logits
        calls.append(SimpleNamespace(name=loaded.name, cls=type(loaded.model).__name__,
                                     chat_template=loaded.tokenizer.chat_template, logits=logits))
        return loaded

    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("hf_cb")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model_loader, "load_model", spy)
            start = time.perf_counter()
            folder = model_loader.default_model_dir(cache)
            seconds = time.perf_counter() - start
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    print(f"\nfirst use (download + conversion): {seconds:.1f} s")
    assert len(calls) == 1, "the GGUF must be loaded exactly once"
    return SimpleNamespace(cache=cache, folder=folder, gguf=calls[0], log="\n".join(records))
