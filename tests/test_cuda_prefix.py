"""GPU tests of prefix caching, rollouts on a model being trained (CUDA graphs and
torch.compile on), and `sleep` / `wake_up`. Greedy tokens are checked teacher-forced."""

import random

import torch
from conftest import random_prompts
from test_cuda import LOGIT_TOL, pytestmark, teacher_forced_gaps, tiny_gpu_model  # noqa: F401

import hf_cb


def shared_prefix_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = random_prompts(4, 100, 300, seed=seed, vocab=1024)
    return [rng.choice(prefixes) + [rng.randrange(3, 1024) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def worst_gap(model, prompts, outs) -> float:
    return max(max(teacher_forced_gaps(model, p, o.token_ids)) for p, o in zip(prompts, outs))


def test_shared_prefixes_on_graphs_are_teacher_forced_argmax():
    model = tiny_gpu_model("qwen3", torch.bfloat16)
    prompts = shared_prefix_prompts(48, seed=1)
    config = hf_cb.EngineConfig(max_num_batched_tokens=256)  # chunked prefill beside cached pages
    outs = model.generate_batch_continuous(prompts, max_new_tokens=24, do_sample=False, engine_config=config)
    engine = hf_cb.get_engine(model)
    assert engine.runner.graphs is not None
    assert engine.stats.prefix_hits > 0.5 * engine.stats.prefix_queries
    assert worst_gap(model, prompts, outs) <= LOGIT_TOL
    assert engine.manager.num_free_pages == engine.manager.num_pages


def test_rl_loop_with_graphs_and_compile():
    """Generate, a loss on the outputs, backward, an optimizer step, generate again: the new
    rollouts come from the new weights (teacher-forced against the updated model), the prefix
    cache computed with the old weights is not used, and the engine is not rebuilt."""
    model = tiny_gpu_model("llama", torch.bfloat16)
    prompts = shared_prefix_prompts(16, seed=2)
    config = hf_cb.EngineConfig(compile=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = None
    for _ in range(3):
        outs = model.generate_batch_continuous(prompts, max_new_tokens=16, do_sample=False, engine_config=config)
        assert engine in (None, hf_cb.get_engine(model))
        engine = hf_cb.get_engine(model)
        assert engine.runner.graphs is not None
        assert worst_gap(model, prompts, outs) <= LOGIT_TOL
        seqs = [p + o.token_ids for p, o in zip(prompts, outs)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device="cuda")
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device="cuda")
        model.train()
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        hits_before = engine.stats.prefix_hits
    again = model.generate_batch_continuous(prompts[:1], max_new_tokens=4, do_sample=False, engine_config=config)
    assert again[0].num_cached_tokens == 0  # the last update made every cached page stale
    assert engine.stats.prefix_hits == hits_before


def test_sleep_frees_the_pool_and_wake_up_restores_it():
    model = tiny_gpu_model("llama", torch.bfloat16)
    prompts = random_prompts(12, 5, 200, seed=3, vocab=1024)
    before = model.generate_batch_continuous(prompts, max_new_tokens=16, do_sample=False)
    engine = hf_cb.get_engine(model)
    pool = engine.num_pages * engine.page_bytes
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated()
    hf_cb.sleep(model)
    freed = used - torch.cuda.memory_allocated()
    assert freed >= 0.99 * pool, (freed, pool)
    hf_cb.wake_up(model)
    assert torch.cuda.memory_allocated() >= used - 0.01 * pool and engine.runner.graphs is not None
    after = model.generate_batch_continuous(prompts, max_new_tokens=16, do_sample=False)
    assert [o.token_ids for o in after] == [o.token_ids for o in before]


def test_compiled_draw_equals_the_eager_one():
    """The sampler's draw is compiled on CUDA (one kernel instead of a dozen passes); it must
    draw what the eager code draws from the same seeds."""
    from hf_cb.sampling.sampler import _draw, draw

    torch.manual_seed(0)
    for rows, vocab in ((3, 1000), (1024, 128256)):
        logits = torch.randn(rows, vocab, device="cuda") * 3
        logits[0, : vocab // 2] = float("-inf")  # filtered tokens are never drawn
        seeds = torch.randint(0, 2**62, (rows,), device="cuda")
        offsets = torch.randint(0, 1000, (rows,), device="cuda")
        got, want = draw(logits, seeds, offsets), _draw(logits, seeds, offsets)
        assert (got == want).float().mean() > 0.99  # float rounding may flip a near tie
        assert got[0] >= vocab // 2
