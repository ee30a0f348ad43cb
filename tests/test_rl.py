"""RL with hf_cb rollouts: generate, train on the outputs, generate again with the new weights.

CPU, float32, greedy where outputs are compared: every rollout equals stock `generate` of the
weights as they are at that moment, and the training forwards of a model whose engine is alive
equal those of a model that never saw hf_cb.
"""

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_prompts, reference_generate, tiny_model
from transformers import GenerationMixin

import hf_cb

EXAMPLES = Path(__file__).parents[1] / "examples"


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad: int = 0):
    """Right-padded prompt+completion rows, their attention mask, and labels that score the
    completion tokens only (-100 on prompts and padding)."""
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(c)
    return ids, mask, labels


def left_padded(prompts: list[list[int]], pad: int = 0):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def reinforce_loss(model, prompts, completions):
    """REINFORCE with a per-token reward: +1 for an even token id, -1 for an odd one, so each
    step pushes the greedy choices away from odd tokens (and so changes them)."""
    ids, mask, labels = (t.to(model.device) for t in completion_batch(prompts, completions))
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    scored = targets != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    reward = torch.where(targets % 2 == 0, 1.0, -1.0)
    return -(reward * logp * scored).sum() / scored.sum()


# -- TRL's GRPOTrainer ------------------------------------------------------------------------


def load_example():
    spec = importlib.util.spec_from_file_location("grpo_trl_example", EXAMPLES / "grpo_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_grpo_example_rollouts_go_through_hf_cb(monkeypatch, tmp_path, capsys):
    pytest.importorskip("trl")
    example = load_example()

    # Stock generate samples in GenerationMixin._sample (greedy and multinomial alike): if TRL's
    # rollouts fell back to it, this raises inside training. (wraps: Transformers reads
    # _sample's signature to sort a custom generate's arguments.)
    @functools.wraps(GenerationMixin._sample)
    def stock_sampling(*args, **kwargs):
        raise AssertionError("a rollout fell back to stock generate")

    monkeypatch.setattr(GenerationMixin, "_sample", stock_sampling)
    initial, _ = example.tiny_model_and_tokenizer()
    result = example.main(max_steps=2, output_dir=str(tmp_path))
    try:
        model = result["model"]
        assert result["num_completions"] == 2 * 8  # 2 steps x (2 prompts x 4 generations)
        assert result["rollout_tokens"] >= result["num_completions"]
        # Every token TRL scored came from the engine. The engine counts sampled tokens, which may
        # include one token per sequence sampled after its EOS under async scheduling and dropped.
        tokens, engine_tokens = result["rollout_tokens"], result["engine_tokens"]
        assert tokens <= engine_tokens <= tokens + result["num_completions"]
        assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(result["losses"])))
        # The policy was trained: its weights moved away from the (same-seed) initial ones.
        moved = [n for n, p in model.named_parameters() if not torch.equal(p, initial.get_parameter(n))]
        assert moved
        out = capsys.readouterr().out
        assert "hf_cb's engine generated" in out and "step 2:" in out
    finally:
        hf_cb.release(result["model"])  # not one of conftest's models: release it here


# -- an RL loop without TRL -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_rl_loop_rollouts_equal_stock_generate_of_the_updated_weights(name):
    model = tiny_model(name)
    twin = tiny_model(name)  # never touched by hf_cb: stock generate of the current weights
    prompts = random_prompts(4, 17, 40, seed=11)  # full pages: the prefix cache holds them
    max_new = 8
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    ids, mask = (t.to(model.device) for t in left_padded(prompts))
    history = []
    for _ in range(4):
        twin.load_state_dict(model.state_dict())
        expected = [reference_generate(twin, p, max_new_tokens=max_new, do_sample=False) for p in prompts]

        model.eval()
        outs = model.generate_batch_continuous(prompts, max_new_tokens=max_new, do_sample=False)
        assert [o.token_ids for o in outs] == expected
        # The drop-in generate (as TRL calls it), with the model in train mode as TRL leaves it.
        model.train()
        hf_cb.enable(model)
        try:
            before = hf_cb.get_engine(model).num_generated_tokens
            with torch.no_grad():
                seqs = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False)
            assert hf_cb.get_engine(model).num_generated_tokens > before  # the engine ran it
        finally:
            hf_cb.disable(model)
        for row, ref in enumerate(expected):
            new = seqs[row, ids.shape[1] :].tolist()
            assert new[: len(ref)] == ref and all(t == 0 for t in new[len(ref) :])
        history.append(expected)

        completions = [o.token_ids for o in outs]
        optimizer.zero_grad()
        loss = reinforce_loss(model, prompts, completions)
        loss.backward()
        optimizer.step()

    changed = sum(a != b for a, b in zip(history, history[1:]))
    assert changed >= 1, "the updates never changed a greedy rollout: the test proves nothing"
    assert hf_cb.get_engine(model) is not None  # one engine lived through every update


def test_load_state_dict_then_generate_uses_the_new_weights():
    model = tiny_model("llama", seed=0)
    other = tiny_model("llama", seed=1)
    prompts = random_prompts(5, 2, 20, seed=3)
    first = [o.token_ids for o in model.generate_batch_continuous(prompts, max_new_tokens=10, do_sample=False)]
    model.load_state_dict(other.state_dict())
    second = [o.token_ids for o in model.generate_batch_continuous(prompts, max_new_tokens=10, do_sample=False)]
    expected = [reference_generate(other, p, max_new_tokens=10, do_sample=False) for p in prompts]
    assert second == expected
    assert second != first  # the seeds give different models: the new weights were used


# -- training forwards while the engine lives on the model -----------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral", "gemma2"])
def test_training_forward_with_engine_equals_model_without_hf_cb(name):
    model = tiny_model(name)
    twin = tiny_model(name)  # same seed, same config, its own attention (sdpa; gemma2: eager)
    original = twin.config._attn_implementation
    # Rows longer than mistral's (48) and gemma2's (32) sliding windows, padded.
    prompts = random_prompts(3, 20, 50, seed=7)
    model.generate_batch_continuous(prompts, max_new_tokens=4, do_sample=False)
    assert model.config._attn_implementation == hf_cb.ATTENTION_NAME
    assert original in ("sdpa", "eager")

    completions = [[(t * 7) % 500 + 3 for t in range(k, k + 12)] for k in range(len(prompts))]
    ids, mask, labels = completion_batch(prompts, completions)  # right-padded
    left_ids, left_mask = left_padded([p + c for p, c in zip(prompts, completions)])  # as TRL pads prompts
    left_labels = left_ids.masked_fill(left_mask == 0, -100)
    assert (mask == 0).any() and (left_mask[:, 0] == 0).any()
    batches = (
        dict(input_ids=ids, attention_mask=mask, labels=labels),
        dict(input_ids=left_ids, attention_mask=left_mask, labels=left_labels),
        dict(input_ids=ids[:1, :30], labels=ids[:1, :30]),  # no mask at all
    )
    for m in (model, twin):
        m.train()
        m.zero_grad()
    for batch in batches:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        ours = model(**batch)
        theirs = twin(**batch)
        torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
        ours.loss.backward()
        theirs.loss.backward()
    twin_params = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        assert p.grad is not None and twin_params[n].grad is not None, n
        torch.testing.assert_close(p.grad, twin_params[n].grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    # And a step of the same optimizer keeps the two models equal.
    for m in (model, twin):
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, twin_params[n], rtol=1e-5, atol=1e-6)
    assert model.config._attn_implementation == hf_cb.ATTENTION_NAME  # training left the engine's attention on
