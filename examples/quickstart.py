"""hf_cb quick start, runnable offline: a tiny random Llama and a word-level tokenizer stand in
for a real checkpoint (with one, use AutoModelForCausalLM/AutoTokenizer.from_pretrained(path)).

    python examples/quickstart.py
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, pipeline

import hf_cb  # registers the "hf_cb" attention and adds model.generate_batch_continuous


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


def main() -> None:
    model, tok = tiny_model_and_tokenizer()
    prompts = word_prompts(40)

    # 1. Continuous batching over the whole list, results in input order.
    outs = model.generate_batch_continuous(prompts, tokenizer=tok, max_new_tokens=16, do_sample=False)
    for c in outs[:3]:
        print(c.finish_reason, len(c.token_ids), c.text)

    # Sampling: per-request seeds make each request reproducible on its own.
    sampled = model.generate_batch_continuous(
        prompts[:4], tokenizer=tok, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=[0, 1, 2, 3]
    )
    print([c.text for c in sampled])

    # 2. The drop-in generate: same arguments, same return value.
    hf_cb.enable(model)
    batch = tok(prompts[:4], return_tensors="pt", padding=True).to(model.device)
    ids = model.generate(**batch, max_new_tokens=8, do_sample=False)
    print(tok.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))

    # 3. Pipelines go through hf_cb once enabled.
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    print(pipe(prompts[:4], batch_size=4, max_new_tokens=8, do_sample=False)[0][0]["generated_text"])

    hf_cb.disable(model)
    hf_cb.release(model)  # frees the engine and its page pool


if __name__ == "__main__":
    main()
