"""The online engine: requests from threads and asyncio tasks at any time, streamed outputs,
aborts, failures. Greedy outputs equal stock `generate` whatever the arrival times."""

import asyncio
import random
import threading
import time

import pytest
from conftest import random_prompts, reference_generate, tiny_model, word_tokenizer, words

import hf_cb
from hf_cb.entrypoints.online import EngineDeadError, Notifier, OnlineEngine, RequestFailed, iterate_async
from hf_cb.sampling.params import SamplingParams

PROMPTS = random_prompts(16, 1, 120, seed=21)
MAX_NEW = [random.Random(22).randint(1, 20) for _ in PROMPTS]
TIGHT = hf_cb.EngineConfig(page_size=8, num_pages=24, max_num_seqs=5, max_num_batched_tokens=40)


@pytest.fixture(scope="module")
def model_and_refs():
    model = tiny_model("llama", seed=12)
    refs = [reference_generate(model, p, max_new_tokens=n, do_sample=False) for p, n in zip(PROMPTS, MAX_NEW)]
    return model, refs


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, eos_token_ids=(2,), **kw)


def assert_idle(online):
    engine = online.engine
    deadline = time.time() + 5
    while (engine.has_unfinished() or engine.manager.num_free_pages < engine.manager.num_pages) and time.time() < deadline:
        time.sleep(0.01)
    assert engine.manager.num_free_pages == engine.manager.num_pages
    assert not engine.has_unfinished()


@pytest.mark.parametrize("config", [None, TIGHT], ids=["default", "tight"])
def test_arrivals_from_threads_equal_generate(model_and_refs, config):
    model, refs = model_and_refs
    online = OnlineEngine(model, config)
    results = [None] * len(PROMPTS)

    def client(i):
        time.sleep(random.Random(i).random() * 0.05)
        stream = online.submit(PROMPTS[i], greedy(MAX_NEW[i]))
        outs = list(stream)
        results[i] = (sum((o.token_ids for o in outs), []), outs[-1].finish_reason, outs)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        for (tokens, reason, outs), ref, n in zip(results, refs, MAX_NEW):
            assert tokens == ref
            assert reason == ("stop" if ref[-1] == 2 and len(ref) <= n else "length")
            assert outs[0].time_to_first_token is not None and outs[0].time_to_first_token > 0
            assert outs[-1].num_generated == len(ref)
        if config is TIGHT:
            assert online.engine.scheduler.num_preemptions > 0
        assert_idle(online)
    finally:
        online.shutdown()


def test_abort_frees_pages_and_others_finish(model_and_refs):
    model, refs = model_and_refs
    online = OnlineEngine(model)
    try:
        doomed = [online.submit(p, SamplingParams(200)) for p in PROMPTS[:4]]
        kept = [online.submit(PROMPTS[i], greedy(MAX_NEW[i])) for i in range(4, 8)]
        first = next(iter(doomed[0]))  # it runs...
        assert first.token_ids
        for s in doomed:
            s.abort()
        for s, ref in zip(kept, refs[4:8]):
            assert sum((o.token_ids for o in s), []) == ref
        assert_idle(online)
        # Each aborted stream ends, with the tokens it had and finish_reason "abort" (reading one
        # used to wait forever).
        for s in doomed:
            outs = list(s)
            assert outs[-1].finish_reason == "abort" and s.seq.finish_reason == "abort"
    finally:
        online.shutdown()


def test_asyncio_consumers_share_one_loop(model_and_refs):
    model, refs = model_and_refs
    tok = word_tokenizer()
    online = OnlineEngine(model, tokenizer=tok)

    async def one(i):
        await asyncio.sleep(random.Random(i).random() * 0.2)
        stream = online.submit(PROMPTS[i], greedy(MAX_NEW[i]))
        tokens, text = [], ""
        async for out in stream:
            tokens += out.token_ids
            text += out.text
        return tokens, text

    async def main():
        return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))

    try:
        results = asyncio.run(main())
        for (tokens, text), ref in zip(results, refs):
            assert tokens == ref
            assert text == tok.decode(ref, skip_special_tokens=True)
        assert_idle(online)
    finally:
        online.shutdown()


def test_n_streams_with_one_notifier_and_stop_strings(model_and_refs):
    model, refs = model_and_refs
    tok = word_tokenizer()
    online = OnlineEngine(model, tokenizer=tok)
    prompt, ref = PROMPTS[3], reference_generate(model, PROMPTS[3], max_new_tokens=12, do_sample=False, eos_token_id=None)
    stop = words(ref[4:6])  # two words in the middle of the greedy output

    async def main():
        from hf_cb.entrypoints.online import AsyncNotifier

        notifier = AsyncNotifier()
        streams = [online.submit(prompt, SamplingParams(12), notifier=notifier, stop=[stop]) for _ in range(3)]
        got = {i: ([], "") for i in range(3)}
        reasons = {}
        async for i, out in iterate_async(streams):
            tokens, text = got[i]
            got[i] = (tokens + out.token_ids, text + out.text)
            if out.finished:
                reasons[i] = out.finish_reason
        return got, reasons

    try:
        got, reasons = asyncio.run(main())
        for i in range(3):
            tokens, text = got[i]
            assert reasons[i] == "stop"
            assert tokens == ref[:6]  # up to and including the token that completed the stop string
            assert text == words(ref[:4]) + " "  # the stop string and what follows are cut
        assert_idle(online)
    finally:
        online.shutdown()


def test_bad_request_is_refused_at_submit_and_the_engine_serves(model_and_refs):
    model, refs = model_and_refs
    online = OnlineEngine(model)
    try:
        with pytest.raises(ValueError, match="exceeds the model's context"):
            online.submit([5] * 500, greedy(100))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            online.submit([5, 10**6], greedy(3))
        assert sum((o.token_ids for o in online.submit(PROMPTS[0], greedy(MAX_NEW[0]))), []) == refs[0]
    finally:
        online.shutdown()


def failing_launch(monkeypatch, runner, fails):
    """Make ``runner.launch`` raise for the batches ``fails(batch, call_number)`` picks."""
    real, calls = runner.launch, []

    def launch(batch, prev):
        calls.append(batch)
        if fails(batch, len(calls)):
            raise RuntimeError("simulated failure")
        return real(batch, prev)

    monkeypatch.setattr(runner, "launch", launch)
    return calls


def tokens_of(stream):
    return sum((o.token_ids for o in stream), [])


@pytest.mark.parametrize("failing_call", [2, 1], ids=["running", "admitting"])
def test_a_step_that_fails_once_fails_no_request(model_and_refs, monkeypatch, failing_call):
    """Its requests are computed again, alone, and give the tokens they would have given."""
    model, refs = model_and_refs
    online = OnlineEngine(model)
    failing_launch(monkeypatch, online.engine.runner, lambda batch, call: call == failing_call)
    try:
        streams = [online.submit(PROMPTS[i], greedy(MAX_NEW[i])) for i in range(4)]
        assert [tokens_of(s) for s in streams] == refs[:4]
        assert_idle(online)
    finally:
        online.shutdown()


def test_a_request_whose_steps_fail_fails_alone(model_and_refs, monkeypatch):
    """The others of its steps are computed again and finish as they would have: greedy ones
    equal generate, a seeded sampled one draws the same tokens."""
    model, refs = model_and_refs
    poison = [7, 7, 7, 3]  # its steps always fail
    sampled = SamplingParams(12, do_sample=True, temperature=0.9, top_k=50)
    online = OnlineEngine(model)
    try:
        expected_sample = tokens_of(online.submit(PROMPTS[5], sampled, seed=11))
        calls = failing_launch(monkeypatch, online.engine.runner,
                               lambda batch, call: any(s.prompt_ids == poison for s in batch.seqs))
        streams = [online.submit(PROMPTS[i], greedy(MAX_NEW[i])) for i in range(4)]
        bad = online.submit(poison, greedy(10))
        lucky = online.submit(PROMPTS[5], sampled, seed=11)
        with pytest.raises(RequestFailed, match="simulated failure"):
            list(bad)
        assert [tokens_of(s) for s in streams] == refs[:4]
        assert tokens_of(lucky) == expected_sample
        assert any(len(b.seqs) == 1 and b.seqs[0].prompt_ids == poison for b in calls)  # it ran alone
        assert_idle(online)
        monkeypatch.undo()
        assert tokens_of(online.submit(PROMPTS[2], greedy(MAX_NEW[2]))) == refs[2]
    finally:
        online.shutdown()


def test_a_failure_of_the_batch_fails_its_requests_once_each_passed_alone(model_and_refs, monkeypatch):
    """A step that fails for its size, not for a request: each passes alone, so when they fail
    together again they fail, rather than being isolated forever; the engine serves on."""
    model, refs = model_and_refs
    online = OnlineEngine(model)
    failing_launch(monkeypatch, online.engine.runner, lambda batch, call: len(batch.seqs) > 1)
    try:
        notifier = Notifier()
        streams = [online.submit(PROMPTS[i], SamplingParams(40), notifier=notifier) for i in range(3)]
        for stream in streams:
            with pytest.raises(RequestFailed, match="simulated failure"):
                list(stream)
        assert_idle(online)
        assert tokens_of(online.submit(PROMPTS[2], greedy(MAX_NEW[2]))) == refs[2]
    finally:
        online.shutdown()


def test_a_dead_loop_fails_waiting_and_new_requests_at_once(model_and_refs, monkeypatch):
    model, _ = model_and_refs
    online = OnlineEngine(model)
    # A bug outside any step (here: delivering outputs) kills the loop.
    monkeypatch.setattr(online, "_deliver", lambda updated: (_ for _ in ()).throw(KeyError("loop bug")))
    try:
        stream = online.submit(PROMPTS[1], SamplingParams(5))
        with pytest.raises(EngineDeadError, match="loop bug"):
            list(stream)
        assert not online.is_alive
        with pytest.raises(EngineDeadError):
            online.submit(PROMPTS[1], SamplingParams(5))
    finally:
        online.shutdown()
        monkeypatch.undo()
        hf_cb.release(model)
