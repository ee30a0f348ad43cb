"""What the parallel examples share: a tiny random Llama and a word-level tokenizer (``w3 ..
w511``), so that they run in seconds anywhere (`quickstart.py` uses a real model), and printing
completions as JSON lines."""

import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast


def tiny_model_and_tokenizer(device: str | None = None):
    """A tiny random Llama (the same weights every call) on ``device`` (default: CUDA if
    present) and a word-level tokenizer over ``w3 .. w511``."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 512)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval(), tok


def save_tiny_model(folder: str) -> str:
    """Save the tiny model (float32) and its tokenizer into ``folder``, for `from_pretrained`."""
    model, tok = tiny_model_and_tokenizer("cpu")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def word_prompts(n: int) -> list[str]:
    """``n`` prompts the tiny tokenizer knows, of 5 to 5 + 3 (n - 1) words."""
    return [" ".join(f"w{(7 * i + j) % 500 + 3}" for j in range(5 + 3 * i)) for i in range(n)]


def print_completions(prompts: list, completions: list) -> None:
    """One JSON line per completion: the prompt, the text, the token ids, the finish reason."""
    for prompt, c in zip(prompts, completions):
        print(json.dumps({"prompt": prompt, "text": c.text, "token_ids": c.token_ids,
                          "finish_reason": c.finish_reason}), flush=True)
