"""Tiny configs for every causal-LM architecture of the installed Transformers: a generic
shrinker over a config's attributes and sub-configs (`shrink`), then `OVERRIDES`, one small table
of per-architecture fixes. Used by the model-coverage sweep (tests/model_sweep.py)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("hf_cb") is None:  # run as a script without hf_cb installed: this checkout's
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from transformers import AutoConfig, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 512
HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
INTERMEDIATE = 128
EXPERT_INTERMEDIATE = 32
EXPERTS = 4
EXPERTS_PER_TOKEN = 2
MIN_LAYERS = 2
MAX_POSITIONS = 512
WINDOW = 32  # sliding windows and attention chunks: shorter than the longest prompt (33) + 12 tokens
INIT = 0.2  # as tests/conftest.py: larger weights spread the logits, so float32 greedy never sits on ties
SEED = 0
PROMPT_LENGTHS = (5, 17, 33)
NEW_TOKENS = 12
TIMEOUT_S = 300.0


def architectures() -> dict[str, str]:
    """model_type -> the causal-LM class name the installed Transformers maps it to."""
    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# -- the tiny config -----------------------------------------------------------------------------

_WIDTH = {"hidden_size", "d_model", "n_embd", "embed_dim", "dim", "hidden_dim", "word_embed_proj_dim", "embedding_size",
          "hidden_size_global", "lru_width", "emb_dim", "adapter_in_dim", "adapter_out_dim", "adapter_input_size",
          "input_embedding_size", "output_embedding_size", "embedding_dim"}
_FFN = {"intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "encoder_ffn_dim", "ffn_hidden_size", "dim_ff",
        "intermediate_size_mlp", "dense_intermediate_size", "first_dense_intermediate_size", "dff", "mlp_dim",
        "prefix_dense_intermediate_size", "mlp_only_intermediate_size", "feed_forward_size", "d_ff", "d_inner"}
_EXPERT_FFN = {"moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
               "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size", "expert_ffn_hidden_size"}
_HEADS = {"num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads", "encoder_attention_heads",
          "attention_heads", "swa_num_attention_heads", "num_decoder_attention_heads", "num_encoder_attention_heads"}
_KV_HEADS = {"num_key_value_heads", "num_kv_heads", "kv_n_heads", "swa_num_key_value_heads", "num_query_groups",
             "multi_query_group_num"}
_HEAD_DIM = {"head_dim", "swa_head_dim", "attention_head_dim", "d_head", "dim_head", "attention_head_size",
             "kv_channels", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "linear_key_head_dim",
             "linear_value_head_dim", "linear_head_dim", "mamba_d_head", "mamba_headdim", "mamba_head_dim",
             "index_head_dim", "indexer_head_dim"}
_SMALL = {
    # MLA
    "kv_lora_rank": 32, "q_lora_rank": 48, "qk_head_dim": 32, "o_lora_rank": 32,
    "rotary_dim": HEAD_DIM // 2,  # partial rotary (GPT-J, CodeGen): a part of the head
    # linear attention, SSM
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_num_heads": 4,
    "state_size": 16, "mamba_d_state": 16, "ssm_state_size": 16, "d_state": 16,
    "mamba_n_heads": 8, "mamba_num_heads": 8, "n_mamba_heads": 8,
    "mamba_n_groups": 1, "mamba_ngroups": 1, "n_groups": 1, "mamba_dt_rank": 8, "time_step_rank": 8,
    "mamba_d_ssm": 128,
    # experts
    "num_experts": EXPERTS, "n_routed_experts": EXPERTS, "num_local_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_experts_per_tok": EXPERTS_PER_TOKEN, "moe_topk": EXPERTS_PER_TOKEN, "top_k_experts": EXPERTS_PER_TOKEN,
    "moe_k": EXPERTS_PER_TOKEN, "moe_top_k": EXPERTS_PER_TOKEN, "num_experts_per_token": EXPERTS_PER_TOKEN,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1,
    "first_k_dense_replace": 1, "num_dense_layers": 1,
    # layers that reuse an earlier layer's K/V (Gemma 3n, Gemma 4): a couple, not most of the stack
    "num_kv_shared_layers": 2,
    # sparse-attention indexers (DeepSeek V3.2, GLM DSA)
    "index_n_heads": 2, "indexer_n_heads": 2, "index_num_heads": 2, "indexer_kv_heads": 1,
    # vision / audio towers, which a text prompt never reaches but the model still builds
    "image_size": 64, "vision_output_dim": HIDDEN, "projector_hidden_size": HIDDEN, "out_hidden_size": HIDDEN,
}
_LAYERS = {"num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
           "num_decoder_layers", "num_encoder_layers"}
_POSITIONS = {"max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions",
              "context_length", "max_source_positions"}
_WINDOWS = {"sliding_window", "sliding_window_size", "attention_window_size", "local_attention_window_len",
            "attention_chunk_size", "window_size"}
_INIT = {"initializer_range", "init_std", "embedding_initializer_range"}
_VOCAB = {"vocab_size", "vocab_size_per_layer_input", "unpadded_vocab_size", "pronunciation_vocab_size",
          "shape_vocab_size"}
_SPECIAL_ID = re.compile(r"(token_ids?|token_index)$")
_BASIC_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

KEEP = object()  # in OVERRIDES: keep the config's own value, drop the generic shrinker's


# Per-architecture fixes, applied over the generic shrinker's values and before the layer count is
# chosen (dotted keys reach sub-configs: "text_config.x"; KEEP drops the shrinker's value; a layer
# count here is taken as is). Each says why the generic shrinker cannot do it alone.
OVERRIDES: dict[str, dict[str, Any]] = {
    # Defaults that leave out what every checkpoint sets, so the model cannot be built from them:
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},  # read as they are by the attention
    "deepseek_v2": {"num_experts_per_tok": EXPERTS_PER_TOKEN},
    "dots1": {"n_routed_experts": EXPERTS, "num_experts_per_tok": EXPERTS_PER_TOKEN, "n_shared_experts": 1},
    "gemma4_assistant": {"text_config.hidden_size_per_layer_input": 0,  # the default fails the config's own checks
                         "text_config.vocab_size_per_layer_input": 0},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM,
                       "indexer_budget": 16, "indexer_compress_ratio": 4},
    "qwen4_exp": {"text_config.indexer_n_heads": 2, "text_config.indexer_kv_heads": 1,
                  "text_config.indexer_head_dim": HEAD_DIM, "text_config.indexer_budget": 16,
                  "text_config.indexer_compress_ratio": 4},
    # Sizes tied to one another that the generic shrinker sets apart:
    "dots3_note_text": {"head_dim": 40},  # the sliding layers: head_dim = their qk_nope (192 -> 24) + qk_rope (16)
    "dots3_note": {"text_config.head_dim": 40},
    "mamba2": {"num_heads": 2 * HIDDEN // HEAD_DIM},  # heads * head_dim = expand (2) * hidden_size
    "reformer": {"axial_pos_embds_dim": (HIDDEN // 2, HIDDEN // 2), "axial_pos_shape": (16, MAX_POSITIONS // 16)},
    # Input, looped and output layers must add up to the layer count.
    "dory": {"num_hidden_layers": 4, "n_input_layers": 1, "n_recurrent_layers": 2, "n_output_layers": 1},
    "xmod": {"default_language": "en_XX"},  # the adapters' language (set_default_language)
    # Stock's native mLSTM step mis-shapes its state at width 64 (qk head dim 4 or 8); width 128 runs.
    "xlstm": {"hidden_size": 128, "embedding_dim": 128, "num_heads": 8},
    "blt": {"encoder_hash_byte_group_vocab": VOCAB},  # 500k rows per hash group otherwise
    # Hybrids whose default is all recurrent (or all attention) layers: the checkpoints mix both.
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]},
    "lfm2": {"num_hidden_layers": 2, "full_attn_idxs": [1]},
    "lfm2_moe": {"num_hidden_layers": 3, "layer_types": ["conv", "conv", "full_attention"]},
    # The shared transformer block's weights are tied across its uses: it needs two of them.
    "zamba": {"num_hidden_layers": 4, "layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"]},
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _target(key: str) -> int | None:
    """The tiny size of a size attribute, or None if ``key`` is not one."""
    for keys, size in ((_WIDTH, HIDDEN), (_FFN, INTERMEDIATE), (_EXPERT_FFN, EXPERT_INTERMEDIATE), (_HEADS, HEADS),
                       (_HEAD_DIM, HEAD_DIM), (_WINDOWS, WINDOW), (_VOCAB, VOCAB)):
        if key in keys:
            return size
    return _SMALL.get(key)


def _shrunk(key: str, value: Any) -> Any:
    """The generic shrinker's value for one attribute, or KEEP."""
    if key in _LAYERS or key in _KV_HEADS:
        return KEEP  # decided with the layer pattern / the query heads
    if key in _POSITIONS:
        return min(value, MAX_POSITIONS) if _is_int(value) and value >= 128 else KEEP
    size = _target(key)
    if size is not None:
        if _is_int(value):
            return size if value > size else KEEP
        if value is None and key in ("head_dim",):
            return HEAD_DIM  # some defaults leave it to the checkpoint, and the model reads it as is
        if isinstance(value, list) and value and all(_is_int(v) for v in value):  # one size per layer
            return [min(v, size) for v in value]
        return KEEP
    if isinstance(value, float) and key in _INIT:
        return INIT
    if _SPECIAL_ID.search(key):
        if _is_int(value) and value >= VOCAB and key in _BASIC_IDS:
            return _BASIC_IDS[key]
        if isinstance(value, list) and key in _BASIC_IDS and any(_is_int(v) and v >= VOCAB for v in value):
            return [_BASIC_IDS[key]]
    return KEEP


def _kv_heads(value: Any, heads: Any) -> Any:
    """K/V heads: 1 stays 1 (MQA), as many as the query heads stays so (MHA), anything else is GQA (2)."""
    if value is None:
        return 2
    if not _is_int(value) or not _is_int(heads):
        return KEEP
    if value == 1:
        return 1
    if value >= heads:
        return HEADS
    return 2


def _scaled(values: dict[str, Any], kwargs: dict[str, Any], inner: dict[str, Any]) -> dict[str, Any]:
    """A per-layer override dict ({"num_attention_heads": 64, ...}) shrunk in proportion to the
    config's own shrinking, so layers stay different from one another."""
    out = {}
    for key, value in inner.items():
        old, new = values.get(key), kwargs.get(key, values.get(key))
        if _is_int(value) and _is_int(old) and _is_int(new) and old > 0:
            scaled = max(1, round(value * new / old))
            if key in _SMALL and "expert" in key:
                scaled = max(scaled, EXPERTS_PER_TOKEN)
            out[key] = scaled
        elif _is_int(value) and _target(key) is not None:
            out[key] = min(value, _target(key))
        else:
            out[key] = value
    return out


def _layer_key(config_dict: dict) -> str | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers"):
        if _is_int(config_dict.get(key)):
            return key
    return None


_NOT_PER_LAYER = {"id2label", "label2id"}


def _per_layer(config: Any, num_layers: int) -> dict[str, Any]:
    """The config's per-layer attributes (and properties): lists with one entry per layer, pattern
    strings with one character per layer, dicts keyed by layer index."""
    found: dict[str, Any] = {}
    stored = config.to_dict()
    names = list(stored)
    names += [n for n in dir(type(config)) if isinstance(getattr(type(config), n, None), property) and not n.startswith("_")]
    for name in names:
        if name in _NOT_PER_LAYER or name in found:
            continue
        try:
            value = stored[name] if name in stored else getattr(config, name)
        except Exception:
            continue
        if isinstance(value, (list, tuple)) and len(value) == num_layers and num_layers > MIN_LAYERS:
            if _is_index_list(value, num_layers) and name != "layer_types":
                continue
            found[name] = list(value)
        elif isinstance(value, str) and "pattern" in name and len(value) == num_layers:
            found[name] = value
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            found[name] = value
    return found


def _is_index_list(value: Any, num_layers: int) -> bool:
    """A list of layer indices (strictly increasing ints below the layer count)."""
    return (isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(v) for v in value)
            and all(a < b for a, b in zip(value, value[1:])) and value[-1] < num_layers and value[0] >= 0)


def _index_lists(config: Any, num_layers: int) -> dict[str, list[int]]:
    found = {}
    for name, value in config.to_dict().items():
        if re.search(r"layer|idx|index|indices", name) and _is_index_list(value, num_layers):
            found[name] = list(value)
    return found


def _kinds(value: Any) -> set[str] | None:
    """The distinct entries of a per-layer attribute, when it names a few kinds of layer (a per-layer
    list of distinct numbers, as KV source layers, is not a pattern to keep)."""
    if isinstance(value, dict):
        return None
    kinds = {repr(v) for v in value}
    return kinds if len(kinds) <= 8 else None


def _truncate(value: Any, n: int) -> Any:
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if int(k) < n}
    return value[:n] if isinstance(value, str) else list(value[:n])


def _sub_configs(config: Any) -> dict[str, Any]:
    return {name: value for name, value in vars(config).items()
            if isinstance(value, transformers.PreTrainedConfig) and not name.startswith("_")}


def _fewest_layers(build: Callable[..., Any], kwargs: dict[str, Any], layer_keys: list[str]) -> dict[str, Any]:
    """``kwargs`` with the fewest layers (at least MIN_LAYERS) whose config still has every kind of
    layer the full-depth config has (per-layer lists, patterns, index lists). Each depth is tried
    first with the per-layer attributes the config derives itself, then with the full-depth ones cut."""
    wide = build(**kwargs)
    depth = getattr(wide, layer_keys[0])
    per_layer = _per_layer(wide, depth)
    indices = _index_lists(wide, depth)
    stored = set(wide.to_dict())
    want = {name: _kinds(value) for name, value in per_layer.items()}

    def fits(config: Any, n: int) -> bool:
        stored_now = config.to_dict()
        for name, kinds in want.items():
            try:
                value = stored_now[name] if name in stored_now else getattr(config, name, None)
            except Exception:  # a property the config cannot compute at this depth
                return False
            if isinstance(per_layer[name], dict):  # per-layer overrides: keep at least one
                if not isinstance(value, dict) or any(int(k) >= n for k in value) or bool(value) < bool(per_layer[name]):
                    return False
                continue
            if value is None or len(value) != n or (kinds is not None and not kinds <= {repr(v) for v in value}):
                return False
        for name in indices:
            value = getattr(config, name, None) or []
            if not value or any(i >= n for i in value):
                return False
        return True

    for n in range(MIN_LAYERS, depth):
        base = {**kwargs, **{k: n for k in layer_keys}}
        for name, value in kwargs.items():  # sizes the shrinker gave per layer
            if name in per_layer:
                base[name] = _truncate(value, n)
        cut = {**base, **{name: _truncate(v, n) for name, v in per_layer.items() if name in stored},
               **{name: [i for i in v if i < n] for name, v in indices.items()}}
        for candidate in (base, cut):
            try:
                config = build(**candidate)
            except Exception:
                continue
            if fits(config, n):
                return candidate
    return kwargs


def shrink(build: Callable[..., Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments that make the config ``build()`` returns tiny (``build(**kwargs)``):
    the generic shrinker, then ``overrides`` (dotted keys reach sub-configs), then the fewest layers
    that keep the layer pattern (unless ``overrides`` sets the layer count)."""
    overrides = overrides or {}
    try:
        default = build()
    except Exception:  # a default that fails its own checks: start from the overrides
        default = build(**_apply({}, overrides))
    values = default.to_dict()
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        new = _shrunk(key, value)
        if new is not KEEP and new != value:
            kwargs[key] = new
    heads = kwargs.get("num_attention_heads", values.get("num_attention_heads"))
    old_heads = values.get("num_attention_heads", values.get("n_head"))
    for key in _KV_HEADS & set(values):
        new = _kv_heads(values[key], old_heads)
        if new is not KEEP and _is_int(heads):
            kwargs[key] = min(new, heads)
    if values.get("tie_word_embeddings") is True:
        # Tied to the input embeddings, a tiny random model's output mostly repeats its last input
        # token whatever attention does (a broken attention would pass): untied, it depends on it.
        kwargs["tie_word_embeddings"] = False
    if values.get("is_decoder") is False:
        kwargs["is_decoder"] = True  # a ForCausalLM/LMHead class of an encoder family runs as a causal decoder
    for name, value in values.items():  # per-layer overrides ({"05": {"head_dim": 512}}), shrunk in proportion
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value) and name not in _NOT_PER_LAYER:
            kwargs[name] = {k: _scaled(values, kwargs, v) if isinstance(v, dict) else v for k, v in value.items()}
    for name, sub in _sub_configs(default).items():
        sub_class = type(sub)
        sub_overrides = {k[len(name) + 1:]: v for k, v in overrides.items() if k.startswith(name + ".")}
        kwargs[name] = {"model_type": sub.model_type, **shrink(sub_class, sub_overrides)}
    kwargs = _apply(kwargs, {k: v for k, v in overrides.items() if "." not in k})
    layer_keys = [k for k in (_layer_key(values),) if k] + [
        k for k in _LAYERS if k != _layer_key(values) and _is_int(values.get(k)) and values[k] > MIN_LAYERS
    ]
    if layer_keys and not any(k in overrides for k in _LAYERS):
        kwargs = _fewest_layers(build, kwargs, layer_keys)
    return kwargs


def _apply(kwargs: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    for dotted, value in overrides.items():
        target = out
        *path, key = dotted.split(".")
        for part in path:
            target = target.setdefault(part, {})
        if value is KEEP:
            target.pop(key, None)
        else:
            target[key] = value
    return out


def tiny_config(model_type: str):
    """The tiny config of ``model_type``: the generic shrinker, then ``OVERRIDES[model_type]``."""

    def build(**kwargs: Any):
        return AutoConfig.for_model(model_type, **kwargs)

    return build(**shrink(build, OVERRIDES.get(model_type, {})))


def special_ids(config: Any) -> set[int]:
    """Every token id a config names (BOS, EOS, PAD, image tokens...), sub-configs included."""
    ids: set[int] = set()
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            try:
                ids |= special_ids(getattr(config, key))
            except Exception:
                pass
        elif _SPECIAL_ID.search(key) or key.endswith("_id") and key != "seed":
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if _is_int(v):
                    ids.add(v)
    return ids


def prompts_for(config: Any, seed: int = SEED) -> list[list[int]]:
    """Three prompts of 5, 17 and 33 ids >= 3, below the vocabulary and away from special tokens."""
    text = config.get_text_config(decoder=True)
    vocab = min(getattr(text, "vocab_size", None) or VOCAB, VOCAB)
    banned = special_ids(config)
    allowed = [i for i in range(3, vocab) if i not in banned]
    rng = random.Random(seed)
    return [[rng.choice(allowed) for _ in range(n)] for n in PROMPT_LENGTHS]


def tiny_model(model_type: str, class_name: str):
    """The tiny config and a seeded float32 model of the class the mapping names."""
    config = tiny_config(model_type)
    model_class = getattr(transformers, class_name)
    wanted = getattr(model_class, "config_class", None)
    if isinstance(wanted, type) and not isinstance(config, wanted):
        # A class that takes one of the config's sub-configs (MusicgenForCausalLM: the decoder's),
        # as from_pretrained gives it through the sub-config's base_config_key.
        config = next((sub for sub in _sub_configs(config).values() if isinstance(sub, wanted)), config)
    torch.manual_seed(SEED)
    model = model_class._from_config(config, dtype=torch.float32).eval()
    # Plain greedy decoding for both sides: the family's default generation settings
    # (repetition penalties, forced tokens, suppressed tokens...) are not what this sweep compares.
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=None, pad_token_id=_first(getattr(config, "pad_token_id", None)) or 0,
        bos_token_id=_first(getattr(config, "bos_token_id", None)),
        decoder_start_token_id=_first(getattr(config, "decoder_start_token_id", None)),
    )
    return config, model


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value
