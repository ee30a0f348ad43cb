"""Prefix caching on CPU: greedy output still equals stock `generate`, hits are what the page
arithmetic says, the page manager never loses a page, and the n samples of a prompt prefill it
once. Weight updates and `sleep` are covered here too."""

import random

import numpy as np
import pytest
import torch
from conftest import VOCAB, random_prompts, reference_generate, tiny_model

import hf_cb
from hf_cb.core.prefix_cache import page_hashes
from hf_cb.manager import OutOfPages, PageManager

PS = 8


def shared_prefix_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts over a few long shared prefixes: ending at page boundaries and one token either
    side, identical prompts, a prompt that is a prefix of another; in random order."""
    rng = random.Random(seed)
    prefixes = random_prompts(3, 3 * PS, 6 * PS, seed=seed + 1)
    prompts = []
    for prefix in prefixes:
        for cut in (PS, 2 * PS - 1, 2 * PS, 2 * PS + 1, len(prefix)):
            prompts.append(prefix[:cut])
        for _ in range(3):
            prompts.append(prefix + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 2 * PS))])
        prompts.append(list(prompts[-1]))  # identical to the one before
    rng.shuffle(prompts)
    return prompts


PROMPTS = shared_prefix_prompts()
MAX_NEW = [random.Random(3).randint(1, 12) for _ in PROMPTS]
ENGINES = {
    "default": hf_cb.EngineConfig(page_size=PS),
    # a pool so small that cached pages are evicted and requests preempted; chunked prefill
    "tight": hf_cb.EngineConfig(page_size=PS, num_pages=14, max_num_seqs=5, max_num_batched_tokens=40),
    "tight-sync": hf_cb.EngineConfig(page_size=PS, num_pages=14, max_num_seqs=5, max_num_batched_tokens=40,
                                     async_scheduling=False),
}


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma3"])
def test_greedy_with_shared_prefixes_equals_generate(name, engine):
    model = tiny_model(name)
    refs = [reference_generate(model, p, max_new_tokens=n, do_sample=False) for p, n in zip(PROMPTS, MAX_NEW)]
    config = ENGINES[engine]
    outs = model.generate_batch_continuous(PROMPTS, max_new_tokens=MAX_NEW, do_sample=False, engine_config=config)
    assert [o.token_ids for o in outs] == refs
    engine_ = hf_cb.get_engine(model)
    assert engine_.stats.prefix_hits > 0
    assert engine_.manager.num_free_pages == engine_.manager.num_pages  # cached pages are free to evict
    if engine.startswith("tight"):
        assert engine_.scheduler.num_preemptions > 0 and engine_.manager.prefix_cache.num_evictions > 0
    # Again, in another order: now the pages of the first run are found (and evicted in "tight").
    order = list(range(len(PROMPTS)))
    random.Random(4).shuffle(order)
    again = model.generate_batch_continuous([PROMPTS[i] for i in order], max_new_tokens=[MAX_NEW[i] for i in order],
                                            do_sample=False, engine_config=config)
    assert [o.token_ids for o in again] == [refs[i] for i in order]


def test_num_cached_tokens_is_the_page_arithmetic():
    model = tiny_model("llama")
    config = hf_cb.EngineConfig(page_size=PS)
    base = random_prompts(1, 5 * PS, 5 * PS, seed=7)[0]
    first = model.generate_batch_continuous([base], max_new_tokens=3, do_sample=False, engine_config=config)[0]
    assert first.num_cached_tokens == 0
    # The first call cached its full pages: prompt and generated tokens alike (its pages hold
    # 5 * PS + 3 tokens; the last generated token was never fed, so 5 full pages are cached).
    cases = {
        "same prompt": (base, 4 * PS),  # at least one token is computed: its last page is not reused
        "one more token": (base + [9], 5 * PS),
        "prompt and its output": (base + first.token_ids[:2] + [9, 9], 5 * PS),
        "shorter by one page": (base[: 4 * PS], 3 * PS),
        "differs in page 3": (base[: 2 * PS] + [base[2 * PS] % 400 + 5] + base[2 * PS + 1 :], 2 * PS),
        "differs in token 0": ([base[0] % 400 + 5] + base[1:], 0),
        "shorter than a page": (base[: PS - 1], 0),
    }
    for what, (prompt, cached) in cases.items():
        out = model.generate_batch_continuous([prompt], max_new_tokens=2, do_sample=False, engine_config=config)[0]
        assert out.num_cached_tokens == cached, what
        assert out.token_ids == reference_generate(model, prompt, max_new_tokens=2, do_sample=False), what


def test_caching_off_finds_nothing():
    model = tiny_model("llama")
    config = hf_cb.EngineConfig(page_size=PS, enable_prefix_caching=False)
    for _ in range(2):
        outs = model.generate_batch_continuous(PROMPTS[:6], max_new_tokens=2, do_sample=False, engine_config=config)
    assert all(o.num_cached_tokens == 0 for o in outs)
    assert hf_cb.get_engine(model).manager.prefix_cache is None


@pytest.mark.parametrize("prompt_len", [4 * PS, 4 * PS + 3])
def test_n_samples_prefill_the_prompt_once(prompt_len):
    model = tiny_model("llama")
    prompt, n = random_prompts(1, prompt_len, prompt_len, seed=8)[0], 8
    kwargs = dict(max_new_tokens=1, do_sample=True, temperature=1.0, num_return_sequences=n, seed=11)
    shared = model.generate_batch_continuous([prompt], engine_config=hf_cb.EngineConfig(page_size=PS), **kwargs)
    engine = hf_cb.get_engine(model)
    cached = (prompt_len - 1) // PS * PS
    # One token sampled per sequence and never fed: every fed token is a prompt token.
    assert engine.stats.tokens == prompt_len + (n - 1) * (prompt_len - cached)
    assert [o.num_cached_tokens for o in shared] == [0] + [cached] * (n - 1)
    alone = model.generate_batch_continuous(
        [prompt], engine_config=hf_cb.EngineConfig(page_size=PS, enable_prefix_caching=False), **kwargs)
    assert hf_cb.get_engine(model).stats.tokens == n * prompt_len
    assert [o.token_ids for o in shared] == [o.token_ids for o in alone]  # same seeds, same samples
    assert len({tuple(o.token_ids) for o in shared}) > 1


def test_updated_weights_are_never_served_from_the_cache():
    model = tiny_model("llama")
    config = hf_cb.EngineConfig(page_size=PS)
    prompt = random_prompts(1, 6 * PS, 6 * PS, seed=9)[0]
    model.generate_batch_continuous([prompt], max_new_tokens=4, do_sample=False, engine_config=config)
    with torch.no_grad():  # an in-place update, as an optimizer step makes
        for p in model.parameters():
            p.mul_(1.05)
    out = model.generate_batch_continuous([prompt], max_new_tokens=4, do_sample=False, engine_config=config)[0]
    assert out.num_cached_tokens == 0
    assert out.token_ids == reference_generate(model, prompt, max_new_tokens=4, do_sample=False)
    again = model.generate_batch_continuous([prompt], max_new_tokens=4, do_sample=False, engine_config=config)[0]
    assert again.num_cached_tokens == 5 * PS and again.token_ids == out.token_ids
    # Writes through .data are invisible to the engine: reset by hand.
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(0.9)
    hf_cb.reset_prefix_cache(model)
    out = model.generate_batch_continuous([prompt], max_new_tokens=4, do_sample=False, engine_config=config)[0]
    assert out.num_cached_tokens == 0
    assert out.token_ids == reference_generate(model, prompt, max_new_tokens=4, do_sample=False)


def test_sleep_frees_the_pool_and_the_next_call_wakes_it():
    model = tiny_model("llama")
    config = hf_cb.EngineConfig(page_size=PS)
    prompts = random_prompts(8, 10, 40, seed=12)  # no shared prefixes among them
    before = model.generate_batch_continuous(prompts, max_new_tokens=4, do_sample=False, engine_config=config)
    engine = hf_cb.get_engine(model)
    num_pages = engine.num_pages
    hf_cb.sleep(model)
    assert engine.asleep and engine.cache is None and engine.manager is None
    after = model.generate_batch_continuous(prompts, max_new_tokens=4, do_sample=False, engine_config=config)
    assert hf_cb.get_engine(model) is engine and not engine.asleep and engine.num_pages == num_pages
    assert [o.token_ids for o in after] == [o.token_ids for o in before]
    assert all(o.num_cached_tokens == 0 for o in after)  # the cache went with the pool
    hf_cb.sleep(model)
    hf_cb.wake_up(model)
    assert not engine.asleep


# -- the page manager with caching ---------------------------------------------------------------


def test_page_hashes_chain_and_extend():
    tokens = list(range(3, 3 + 4 * PS))
    whole = page_hashes(tokens, PS, [], 4)
    assert page_hashes(tokens, PS, page_hashes(tokens, PS, [], 2), 4) == whole
    other = page_hashes([99] + tokens[1:], PS, [], 4)
    assert all(a != b for a, b in zip(whole, other))  # a different first token changes every page
    assert len(set(whole)) == 4


def test_random_operations_with_caching_never_lose_a_page_or_serve_an_evicted_one():
    rng = random.Random(5)
    m = PageManager(30, PS, 8, 20, prefix_caching=True)
    cache = m.prefix_cache
    contents: dict[bytes, tuple] = {}  # hash -> the tokens it names, for every page ever cached
    held: dict[int, list[int]] = {}  # sequence -> its tokens
    bases = [[rng.randrange(3, 50) for _ in range(10 * PS)] for _ in range(3)]
    next_id = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.5 and len(held) < 8:
            tokens = rng.choice(bases)[: rng.randint(1, 10 * PS)] + [rng.randrange(3, 50)] * rng.randint(0, 2)
            hashes = page_hashes(tokens, PS, [], (len(tokens) - 1) // PS)
            prefix = m.match(hashes)
            for page, h in zip(prefix, hashes):  # a hit is a page that holds exactly those tokens
                assert cache.hash_of[page] == h
            if m.can_allocate(next_id, len(tokens), prefix):
                m.allocate(next_id, len(tokens), prefix)
                assert list(m.pages_of(next_id)[: len(prefix)]) == prefix
                full = len(tokens) // PS
                all_hashes = page_hashes(tokens, PS, [], full)
                m.register(next_id, all_hashes, len(prefix))
                for i, h in enumerate(all_hashes):
                    contents.setdefault(h, tuple(tokens[: (i + 1) * PS]))
                    assert contents[h] == tuple(tokens[: (i + 1) * PS])
                held[next_id] = tokens
            else:
                with pytest.raises(OutOfPages):
                    m.allocate(next_id, len(tokens), prefix)
                assert not m.has(next_id)
            next_id += 1
        elif op < 0.93 and held:
            s = rng.choice(list(held))
            m.free(s)
            del held[s]
        else:
            m.reset_prefix_cache()
        # Every page is free, evictable or held, once; reference counts equal the holders.
        count = np.zeros(m.num_pages, dtype=np.int64)
        for s in held:
            count[m.pages_of(s)] += 1
        free, evictable = m._free_pages, list(cache.evictable)
        assert len(set(free) | set(evictable)) == len(free) + len(evictable) == m.num_free_pages
        assert (count[free] == 0).all() and (count[evictable] == 0).all()
        assert (count == m.ref_counts).all()
        assert m.num_free_pages + int((count > 0).sum()) == m.num_pages
        assert set(cache.evictable) <= set(cache.hash_of) and len(cache.page_of) == len(cache.hash_of)
    for s in list(held):
        m.free(s)
    assert (m.ref_counts == 0).all() and m.num_free_pages == m.num_pages
