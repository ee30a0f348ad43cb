"""`pipeline("text-generation")` and text prompts through hf_cb."""

import torch
from conftest import random_prompts, tiny_model, word_tokenizer, words
from transformers import pipeline

import hf_cb


def test_pipeline_batches_give_the_same_texts_with_and_without_hf_cb():
    model, tok = tiny_model("qwen3", seed=5), word_tokenizer()
    texts = [words(p) for p in random_prompts(10, 2, 40, seed=9)]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    kw = dict(batch_size=4, max_new_tokens=12, do_sample=False)
    stock = pipe(texts, **kw)
    hf_cb.enable(model)
    calls = []
    runner = hf_cb.get_engine(model).runner
    launch = runner.launch
    runner.launch = lambda *a: calls.append(1) or launch(*a)
    try:
        ours = pipe(texts, **kw)
    finally:
        hf_cb.disable(model)
    assert calls, "the pipeline did not go through hf_cb"
    assert [o[0]["generated_text"] for o in ours] == [s[0]["generated_text"] for s in stock]


def test_text_prompts_and_decoded_completions():
    model, tok = tiny_model("llama", seed=6), word_tokenizer()
    texts = [words(p) for p in random_prompts(4, 2, 20, seed=10)]
    outs = model.generate_batch_continuous(texts, tokenizer=tok, max_new_tokens=6, do_sample=False)
    for text, out in zip(texts, outs):
        assert out.prompt_ids == tok(text)["input_ids"]
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
        ids = torch.tensor([out.prompt_ids])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist()
