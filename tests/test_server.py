"""The OpenAI-compatible server's routes, streaming and metrics, against offline
`generate_batch_continuous` (see server_support.py)."""

from __future__ import annotations

import pytest
from conftest import random_prompts, words
from server_support import CHAT_IDS, MESSAGES, NAME, PROMPTS, assert_idle, read_metrics, sse_events

import hf_cb

# The test extra installs both; a machine without them (the GPU one) skips the module.
pytest.importorskip("openai")
pytest.importorskip("hf_cb.server")

# -- routes ------------------------------------------------------------------------------------


def test_models_and_health(served, client, http):
    assert [m.id for m in client.models.list().data] == [NAME]
    r = http.get("/v1/models")
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [NAME]
    assert r.json()["data"][0]["max_model_len"] == 512
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


@pytest.mark.parametrize("form", ["str", "list_of_str", "ids", "list_of_ids"])
def test_completion_prompt_forms_equal_offline(served, client, offline, form):
    prompts = PROMPTS[:1] if form in ("str", "ids") else PROMPTS[:3]
    prompt = {"str": words(prompts[0]), "list_of_str": [words(p) for p in prompts], "ids": prompts[0],
              "list_of_ids": prompts}[form]
    refs = offline(prompts, 10)
    resp = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
    assert resp.object == "text_completion" and resp.model == NAME
    assert [c.index for c in resp.choices] == list(range(len(prompts)))
    for choice, ref in zip(resp.choices, refs):
        assert choice.text == ref.text and choice.text
        assert choice.finish_reason == ref.finish_reason
    assert resp.usage.prompt_tokens == sum(map(len, prompts))
    assert resp.usage.completion_tokens == sum(len(r.token_ids) for r in refs)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert_idle(served.online)


def test_routes_and_their_unprefixed_aliases(http, offline):
    ref = offline([PROMPTS[1]], 9)[0]
    chat_ref = offline([CHAT_IDS], 9)[0]
    for path in ("/v1/completions", "/completions"):
        r = http.post(path, json={"model": NAME, "prompt": PROMPTS[1], "max_tokens": 9, "temperature": 0})
        assert r.status_code == 200, (path, r.text)
        assert r.json()["choices"][0]["text"] == ref.text
    for path in ("/v1/chat/completions", "/chat/completions"):
        r = http.post(path, json={"model": NAME, "messages": MESSAGES, "max_tokens": 9, "temperature": 0})
        assert r.status_code == 200, (path, r.text)
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": chat_ref.text}
        assert body["usage"]["prompt_tokens"] == len(CHAT_IDS)
        assert body["usage"]["completion_tokens"] == len(chat_ref.token_ids)


def test_chat_max_tokens_and_max_completion_tokens(client, offline):
    ref = offline([CHAT_IDS], 7)[0]
    assert ref.finish_reason == "length"
    for limit in ({"max_tokens": 7}, {"max_completion_tokens": 7}):
        resp = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, **limit)
        (choice,) = resp.choices
        assert choice.message.content == ref.text and choice.message.role == "assistant"
        assert choice.finish_reason == "length" and resp.usage.completion_tokens == 7
    # max_completion_tokens wins over the deprecated max_tokens
    resp = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=3,
                                          max_completion_tokens=7)
    assert resp.choices[0].message.content == ref.text


# -- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streamed_deltas_concatenate_to_the_response(client, offline, chat):
    kwargs = dict(model=NAME, max_tokens=12, n=3, seed=9, temperature=1.0)
    if chat:
        create, kwargs["messages"] = client.chat.completions.create, MESSAGES
    else:
        create, kwargs["prompt"] = client.completions.create, PROMPTS[1]
    whole = create(**kwargs)
    texts, reasons = ["", "", ""], [None] * 3
    chunks = list(create(**kwargs, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        for c in chunk.choices:
            texts[c.index] += (c.delta.content or "") if chat else c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    got = [c.message.content if chat else c.text for c in whole.choices]
    assert texts == got and all(got)
    assert reasons == [c.finish_reason for c in whole.choices]
    assert last.usage.model_dump() == whole.usage.model_dump()
    # the sampled choices are offline's with the same seed (sample j of seed 9)
    refs = offline([CHAT_IDS if chat else PROMPTS[1]], 12, temperature=1.0, seed=9, num_return_sequences=3)
    assert got == [r.text for r in refs]


def test_raw_stream_ends_with_done(http, offline):
    ref = offline([PROMPTS[2]], 6)[0]
    body = {"prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0, "stream": True}
    for include_usage in (False, True):
        request = {**body, "stream_options": {"include_usage": include_usage}}
        with http.stream("POST", "/v1/completions", json=request) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        if include_usage:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(ref.token_ids)
            assert chunks[-1]["usage"]["prompt_tokens"] == len(PROMPTS[2])
            chunks = chunks[:-1]
        assert all(("usage" in c) == include_usage for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
        assert chunks[-1]["choices"][0]["finish_reason"] == ref.finish_reason
    # chat: the first chunk opens the assistant's message
    with http.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 6, "temperature": 0,
                                                            "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["object"] == "chat.completion.chunk"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == offline([CHAT_IDS], 6)[0].text


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_count_requests(served, http, offline):
    assert_idle(served.online)
    before = read_metrics(http)
    for name in ("hf_cb_num_requests_running", "hf_cb_num_requests_waiting", "hf_cb_kv_cache_usage_ratio",
                 "hf_cb_prompt_tokens_total", "hf_cb_generation_tokens_total",
                 "hf_cb_time_to_first_token_seconds_count", "hf_cb_inter_token_latency_seconds_count",
                 "hf_cb_time_to_first_token_seconds_bucket", "hf_cb_inter_token_latency_seconds_sum"):
        assert name in before, name
    assert before["hf_cb_num_requests_running"] == before["hf_cb_num_requests_waiting"] == 0
    assert before["hf_cb_kv_cache_usage_ratio"] == 0
    ref = offline([PROMPTS[3]], 10)[0]
    r = http.post("/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 10, "temperature": 0, "n": 2})
    assert r.status_code == 200
    after = read_metrics(http)

    def grew(name):
        return after[name] - before[name]

    assert grew("hf_cb_prompt_tokens_total") == len(PROMPTS[3])
    assert grew("hf_cb_generation_tokens_total") == 2 * len(ref.token_ids)
    assert grew("hf_cb_time_to_first_token_seconds_count") == 2  # one first token per choice
    assert grew("hf_cb_time_to_first_token_seconds_bucket") == 2
    assert grew("hf_cb_time_to_first_token_seconds_sum") > 0
    assert grew("hf_cb_inter_token_latency_seconds_count") == 2 * (len(ref.token_ids) - 1)


def test_metrics_count_prefix_cache_hits(served, http):
    page = hf_cb.EngineConfig().page_size  # the server's
    prompt = random_prompts(1, 2 * page + 8, 2 * page + 8, seed=77)[0]  # no other test sends it
    before = read_metrics(http)
    for _ in range(2):
        body = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
        assert http.post("/v1/completions", json=body).status_code == 200
    after = read_metrics(http)
    assert after["hf_cb_prefix_cache_queries_total"] - before["hf_cb_prefix_cache_queries_total"] == 2 * len(prompt)
    # the second request found the first one's two full pages (its last token is computed)
    assert after["hf_cb_prefix_cache_hits_total"] - before["hf_cb_prefix_cache_hits_total"] == 2 * page
