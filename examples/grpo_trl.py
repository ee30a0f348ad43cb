"""GRPO with TRL, rollouts through hf_cb, runnable offline on CPU in seconds: a tiny random
Llama and a word-level tokenizer stand in for a real checkpoint.

    pip install trl        # tested with trl 1.16.0, transformers 5.24
    python examples/grpo_trl.py

How it plugs in: without vLLM and without ``use_transformers_continuous_batching``, TRL's
`GRPOTrainer` samples its rollouts with ``unwrapped_model.generate(input_ids=..., attention_mask=...,
generation_config=...)`` on a left-padded batch, with a `GenerationConfig` built from the
`GRPOConfig` (``max_new_tokens=max_completion_length``, ``do_sample=True``, ``temperature``,
``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, the pad/BOS/EOS ids, ``disable_compile``,
``cache_implementation``). `hf_cb.enable(model)` makes that call the continuous-batching drop-in,
so nothing else changes: enable the model, then hand it to the trainer. The policy's training
forwards run the model's own code; outside an engine step hf_cb's attention is plain SDPA.

What would send the rollouts back to stock `generate` (silently, still correct, just not
through hf_cb): ``GRPOConfig(cache_implementation=...)``, or ``generation_kwargs`` that hf_cb
does not reproduce (``num_beams``, ``no_repeat_ngram_size``, ``suppress_tokens``, ...; see
hf_cb/generation_args.py), as would a vision-language processor (TRL adds ``suppress_tokens``).
Leave ``use_vllm`` and ``use_transformers_continuous_batching`` off: they bypass
``model.generate``. The example prints the engine's generated-token count beside the number of
rollout tokens TRL scored (tests/test_rl.py asserts that no rollout reached stock sampling).

With a real checkpoint on a GPU: load it with ``AutoModelForCausalLM.from_pretrained``, call
``hf_cb.enable(model)``, pass it to `GRPOTrainer` as here (``bf16=True`` as usual). The engine is
built at the first rollout and by default gives 90 % of the free GPU memory to KV pages, before
the optimizer has allocated its state: size the pool first, e.g.
``hf_cb.get_engine(model, hf_cb.EngineConfig(memory_utilization=0.3))`` (later calls reuse it).
"""

from __future__ import annotations

import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

import hf_cb

VOCAB = 512


def tiny_model_and_tokenizer(seed: int = 0):
    """A 2-layer random Llama (float32) and a word-level tokenizer over ``w3 .. w511``."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tok


def even_word_reward(completion_ids: list[list[int]], **kwargs) -> list[float]:
    """The fraction of a completion's tokens that are even-numbered words: any random policy
    scores about 0.5, with enough spread within a group for GRPO's advantages."""
    return [sum(t % 2 == 0 and t > 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def prompts(n: int) -> list[str]:
    return [" ".join(f"w{(7 * i + 3 * j) % 500 + 3}" for j in range(3 + i % 5)) for i in range(n)]


def main(max_steps: int = 2, output_dir: str | None = None, verbose: bool = True) -> dict:
    """Train ``max_steps`` GRPO steps; returns the trainer, the model and rollout counts."""
    model, tok = tiny_model_and_tokenizer()
    hf_cb.enable(model)  # TRL's rollouts call model.generate: now the continuous-batching drop-in

    rollout_tokens: list[int] = []  # tokens of every completion TRL scored (through EOS)

    def reward(completion_ids, **kwargs):
        rollout_tokens.extend(len(ids) for ids in completion_ids)
        return even_word_reward(completion_ids)

    reward.__name__ = "even_word_reward"
    tmp = None
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory()
        output_dir = tmp.name
    args = GRPOConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        num_generations=4,  # 2 prompts x 4 completions per step
        max_completion_length=12,
        learning_rate=1e-3,
        bf16=False,  # float32 on CPU
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts(32)}),
        processing_class=tok,
    )
    try:
        trainer.train()
    finally:
        if tmp is not None:
            tmp.cleanup()

    engine = hf_cb.get_engine(model)
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    result = {
        "trainer": trainer,
        "model": model,
        "tokenizer": tok,
        "rollout_tokens": sum(rollout_tokens),
        "num_completions": len(rollout_tokens),
        "engine_tokens": engine.num_generated_tokens,
        "rewards": [entry["reward"] for entry in logs],
        "losses": [entry.get("loss") for entry in logs],
    }
    if verbose:
        for step, entry in enumerate(logs, 1):
            print(f"step {step}: loss {entry.get('loss', float('nan')):.4f} reward {entry['reward']:.3f} "
                  f"(std {entry.get('reward_std', float('nan')):.3f}), "
                  f"mean completion length {entry.get('completions/mean_length', float('nan')):.1f}")
        print(f"{result['num_completions']} rollouts, {result['rollout_tokens']} tokens; "
              f"hf_cb's engine generated {result['engine_tokens']} tokens")
        sample = model.generate_batch_continuous(prompts(2), tokenizer=tok, max_new_tokens=8, do_sample=False)
        for p, c in zip(prompts(2), sample):
            print(f"greedy after training: {p!r} -> {c.text!r}")
    return result


if __name__ == "__main__":
    main()
