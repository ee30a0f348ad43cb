"""The server under load: 200 streamed requests from 50 concurrent asyncio clients, a third of
which drop their connection mid-stream. Afterwards nothing is left running or holding pages,
and every request that was not dropped got exactly its offline greedy answer."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
from conftest import random_prompts, tiny_model, word_tokenizer

import hf_cb
from hf_cb.entrypoints.online import OnlineEngine

HTTPServer = pytest.importorskip("hf_cb.server").HTTPServer  # the serve extra; the GPU machine lacks it

NUM_REQUESTS, NUM_CLIENTS = 200, 50
PROMPTS = random_prompts(NUM_REQUESTS, 2, 10, seed=61)
MAX_TOKENS = [random.Random(62).randint(8, 16) for _ in PROMPTS]
DROPPED = set(range(0, NUM_REQUESTS, 3))  # 67 requests
DROPPED_MAX_TOKENS = 300  # far more than they run before their client goes: an abort shows
TIME_LIMIT_S = 60


async def one_request(client: httpx.AsyncClient, i: int) -> tuple[str, str | None, int | None] | None:
    """The text, finish reason and completion tokens of request ``i`` (None if it dropped)."""
    dropped = i in DROPPED
    body = {"prompt": PROMPTS[i], "temperature": 0, "stream": True}
    if dropped:
        body.update(max_tokens=DROPPED_MAX_TOKENS, ignore_eos=True)
    else:
        body.update(max_tokens=MAX_TOKENS[i], stream_options={"include_usage": True})
    text, reason, completion_tokens, chunks = "", None, None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            event = json.loads(data)
            chunks += 1
            if dropped and chunks == 1 + i % 3:
                return None  # leaving the block closes the connection mid-stream
            if event.get("usage"):
                completion_tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                text += choice["text"]
                reason = choice["finish_reason"] or reason
    assert not dropped, f"request {i} ended before its client dropped it"
    return text, reason, completion_tokens


async def run_clients(url: str) -> list:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in random.Random(63).sample(range(NUM_REQUESTS), NUM_REQUESTS):  # drops spread over the run
        queue.put_nowait(i)
    results: list = [None] * NUM_REQUESTS

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await one_request(client, i)

    limits = httpx.Limits(max_connections=NUM_CLIENTS, max_keepalive_connections=NUM_CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(NUM_CLIENTS)))
    return results


def test_many_streaming_clients_some_dropping():
    model = tiny_model("llama", seed=64)
    tok = word_tokenizer()
    kept = [i for i in range(NUM_REQUESTS) if i not in DROPPED]
    refs = dict(zip(kept, model.generate_batch_continuous([PROMPTS[i] for i in kept], tokenizer=tok, do_sample=False,
                                                          max_new_tokens=[MAX_TOKENS[i] for i in kept], progress=False)))
    online = OnlineEngine(model, tokenizer=tok)
    engine = online.engine
    try:
        with HTTPServer(online, tok, model_name="tiny", port=0, log_level="warning") as server:
            generated = engine.num_generated_tokens
            start = time.monotonic()
            results = asyncio.run(asyncio.wait_for(run_clients(server.url), TIME_LIMIT_S))
            seconds = time.monotonic() - start
            # Idle: no request, no page in use (the last aborts land within a step or two).
            deadline = time.monotonic() + 5
            while (online.num_requests() != (0, 0) or engine.manager.num_free_pages != engine.manager.num_pages) \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
            assert online.num_requests() == (0, 0) and not engine.has_unfinished()
            assert engine.manager.num_free_pages == engine.manager.num_pages
            assert server.bridge.streams == {}
            metrics = httpx.get(server.url + "/metrics").text
            for gauge in ("hf_cb_num_requests_running", "hf_cb_num_requests_waiting", "hf_cb_kv_cache_usage_ratio"):
                assert f"\n{gauge} 0.0\n" in metrics, gauge
            total = engine.num_generated_tokens - generated
        for i in kept:
            text, reason, completion_tokens = results[i]
            assert (text, reason, completion_tokens) == (refs[i].text, refs[i].finish_reason, len(refs[i].token_ids)), i
        assert all(results[i] is None for i in DROPPED)
        # Dropped requests were aborted: far fewer tokens than running them to their end would give.
        kept_tokens = sum(len(r.token_ids) for r in refs.values())
        dropped_tokens = total - kept_tokens
        print(f"\n{NUM_REQUESTS} requests in {seconds:.1f} s; dropped ones generated "
              f"{dropped_tokens / len(DROPPED):.1f} tokens each on average")
        assert dropped_tokens < len(DROPPED) * DROPPED_MAX_TOKENS / 3
    finally:
        online.shutdown()
        hf_cb.release(model)
