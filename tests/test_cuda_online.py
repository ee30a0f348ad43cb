"""GPU tests of the per-request semantics and the online engine (FlashInfer, CUDA graphs, bf16):
logprobs from graph and eager steps, penalties that switch overlapped scheduling off per step,
arrivals, aborts and stop strings under the step thread. Greedy tokens are checked
teacher-forced, as in test_cuda.py."""

import random
import threading
import time

import pytest
import torch
from conftest import random_prompts, word_tokenizer, words
from test_cuda import LOGIT_TOL, PROMPTS, pytestmark, teacher_forced_gaps, tiny_gpu_model  # noqa: F401

import hf_cb
from hf_cb.entrypoints.online import OnlineEngine
from hf_cb.sampling.params import SamplingParams

MAX_NEW = [(i * 5) % 40 + 2 for i in range(len(PROMPTS))]


def test_logprobs_on_graph_and_eager_steps():
    model = tiny_gpu_model("llama", torch.bfloat16)
    outs = model.generate_batch_continuous(PROMPTS[:24], max_new_tokens=MAX_NEW[:24], do_sample=False, logprobs=3)
    assert hf_cb.get_engine(model).runner.graphs is not None
    for prompt, out in zip(PROMPTS, outs):
        assert len(out.logprobs) == len(out.token_ids)
        full = torch.tensor([prompt + out.token_ids], device="cuda")
        with torch.no_grad():
            ref = torch.log_softmax(model(full).logits[0, len(prompt) - 1 : -1].float(), -1)
        for k, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            assert lp.token_id == token and len(lp.top) == 3
            assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
            assert abs(lp.logprob - ref[k, token].item()) < 0.1  # bf16 kernels against SDPA
            assert lp.logprob >= lp.top[0][1] - 0.05  # greedy: the chosen token is (about) the top one


def test_penalties_beside_plain_requests():
    """Penalised rows need their tokens on the host: those steps do not overlap, the others do."""
    model = tiny_gpu_model("qwen3", torch.bfloat16)
    engine = hf_cb.get_engine(model)
    plain = [engine.add_request(p, SamplingParams(n, eos_token_ids=(2,)), seed=i) for i, (p, n) in enumerate(zip(PROMPTS[:20], MAX_NEW))]
    penalised = [
        engine.add_request(p, SamplingParams(30, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.2), seed=i)
        for i, p in enumerate(PROMPTS[20:28])
    ]
    engine.run(plain + penalised)
    for seq in penalised:
        out = seq.output_ids
        assert len(out) == 30
        assert len(set(out)) > 20  # the penalties spread the choices (greedy repeats without them)
    for seq, prompt in zip(plain, PROMPTS):
        assert max(teacher_forced_gaps(model, prompt, seq.output_ids)) <= LOGIT_TOL
    assert engine.manager.num_free_pages == engine.manager.num_pages


def test_online_engine_arrivals_aborts_and_stops_on_graphs():
    model = tiny_gpu_model("llama", torch.bfloat16)
    tok = word_tokenizer(1024)
    online = OnlineEngine(model, hf_cb.EngineConfig(compile=False), tokenizer=tok)
    results, aborted = {}, []

    def client(i):
        time.sleep(random.Random(i).random() * 0.2)
        stream = online.submit(PROMPTS[i], SamplingParams(MAX_NEW[i], eos_token_ids=(2,)))
        if i % 5 == 0:  # a client that leaves after its first output
            next(iter(stream))
            stream.abort()
            aborted.append(i)
            return
        results[i] = sum((o.token_ids for o in stream), [])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 32 and len(aborted) == 8
        for i, tokens in results.items():
            assert 1 <= len(tokens) <= MAX_NEW[i]
            assert max(teacher_forced_gaps(model, PROMPTS[i], tokens)) <= LOGIT_TOL
        # A stop string ends a stream early, cut before it.
        ref = results[1]
        if len(ref) > 6:
            stop = words(ref[3:5])
            stream = online.submit(PROMPTS[1], SamplingParams(MAX_NEW[1], eos_token_ids=(2,)), stop=[stop])
            outs = list(stream)
            # Up to the token that completes the string's first occurrence (tokens may repeat).
            first = next(k for k in range(1, len(ref) + 1) if stop in words(ref[:k]))
            assert outs[-1].finish_reason == "stop" and sum((o.token_ids for o in outs), []) == ref[:first]
        deadline = time.time() + 5
        while online.kv_cache_usage() > 0 and time.time() < deadline:
            time.sleep(0.01)
        assert online.kv_cache_usage() == 0 and online.num_requests() == (0, 0)
    finally:
        online.shutdown()


def test_server_greedy_completions_are_teacher_forced_argmax():
    pytest.importorskip("fastapi")
    import httpx

    from hf_cb.server import HTTPServer

    model = tiny_gpu_model("qwen3", torch.bfloat16)
    prompts = random_prompts(12, 5, 300, seed=3, vocab=1024)
    tok = word_tokenizer(1024)
    online = OnlineEngine(model)
    try:
        with HTTPServer(online, tok, model_name="m", port=0) as server, httpx.Client(base_url=server.url, timeout=60) as c:
            for prompt in prompts:
                r = c.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 24, "temperature": 0,
                                                    "ignore_eos": True, "skip_special_tokens": False})
                assert r.status_code == 200
                tokens = [tok.convert_tokens_to_ids(w) for w in r.json()["choices"][0]["text"].split()]
                assert len(tokens) == 24
                assert max(teacher_forced_gaps(model, prompt, tokens)) <= LOGIT_TOL
    finally:
        online.shutdown()
