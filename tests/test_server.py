"""The OpenAI-compatible server: `HTTPServer` over an `OnlineEngine` on a tiny Llama with the
word tokenizer, driven by the official ``openai`` client and by raw HTTP (httpx).

Every greedy answer equals offline `generate_batch_continuous` on a second model built with
the same seed (the served model's engine belongs to its `OnlineEngine`); with the word
tokenizer a text is the words of its token ids, so texts compare token for token.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import hf_cb
from conftest import chat_word_tokenizer, VOCAB, keep_engine, random_prompts, tiny_model, words
from hf_cb.online import OnlineEngine

# The test extra installs both; a machine without them (the GPU one) skips the module.
openai = pytest.importorskip("openai")
HTTPServer = pytest.importorskip("hf_cb.server").HTTPServer

NAME = "tiny-llama"
SEED = 31
# Each message's words, then "w3" as the assistant's cue: the prompt's ids are known exactly.
PROMPTS = random_prompts(4, 3, 8, seed=41)
MESSAGES = [{"role": "system", "content": words(PROMPTS[2])}, {"role": "user", "content": words(PROMPTS[3])}]
CHAT_IDS = PROMPTS[2] + PROMPTS[3] + [3]
ERROR_KEYS = {"message", "type", "param", "code"}


def ids_of(text: str) -> list[int]:
    """The token ids of a word tokenizer text (special tokens are skipped in texts)."""
    return [int(word[1:]) for word in text.split()]


def assert_idle(online: OnlineEngine, timeout: float = 5.0) -> None:
    """No request left and every page free (aborts land within a step: poll briefly)."""
    engine = online.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (not engine.has_unfinished() and online.num_requests() == (0, 0)
                and engine.manager.num_free_pages == engine.manager.num_pages):
            return
        time.sleep(0.02)
    assert online.num_requests() == (0, 0)
    assert engine.manager.num_free_pages == engine.manager.num_pages
    assert not engine.has_unfinished()


def assert_server_idle(served: SimpleNamespace) -> None:
    """Idle, and the engine's side of the front end's socket holds no stream either."""
    assert_idle(served.online)
    assert served.server.bridge.streams == {}


def assert_error(response: httpx.Response, status: int, param: str | None, *fragments: str) -> dict:
    """An OpenAI error body naming the problem."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert error["param"] == param, error
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


class Offline:
    """`generate_batch_continuous` on a model identical to the served one."""

    def __init__(self, tokenizer):
        self.model = keep_engine(tiny_model("llama", seed=SEED))  # released by the fixture
        self.tokenizer = tokenizer

    def __call__(self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0, **kwargs):
        if temperature > 0:  # the server's defaults for what the request leaves out
            kwargs = {"top_k": 0, "top_p": 1.0, **kwargs, "do_sample": True, "temperature": temperature}
        else:
            kwargs = {**kwargs, "do_sample": False}
        return self.model.generate_batch_continuous(prompts, max_new_tokens=max_tokens, tokenizer=self.tokenizer,
                                                    progress=False, **kwargs)


@pytest.fixture(scope="module")
def tok():
    return chat_word_tokenizer()


@pytest.fixture(scope="module")
def offline(tok):
    offline = Offline(tok)
    yield offline
    hf_cb.release(offline.model)


def start_server(tok) -> SimpleNamespace:
    """A server for a module's tests: its model is kept from the per-test release (`stop_server`)."""
    model = keep_engine(tiny_model("llama", seed=SEED))
    online = OnlineEngine(model, tokenizer=tok)
    try:
        server = HTTPServer(online, tok, model_name=NAME, port=0, log_level="warning").start()
    except BaseException:
        online.shutdown()
        raise
    return SimpleNamespace(model=model, online=online, server=server, url=server.url)


def stop_server(served: SimpleNamespace) -> None:
    served.server.stop()
    served.online.shutdown()
    hf_cb.release(served.model)


@pytest.fixture(scope="module")
def served(tok):
    """One server for the module's tests."""
    served = start_server(tok)
    yield served
    stop_server(served)


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def greedy0(offline):
    """PROMPTS[0]'s greedy answer: what 'the server still serves' is checked with."""
    return offline([PROMPTS[0]], 8)[0]


def assert_serves(http, greedy0) -> None:
    r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy0.text


def sse_events(lines) -> list:
    """The payloads of a server-sent event stream (``[DONE]`` as the string)."""
    events = []
    for line in lines:
        if line:
            assert line.startswith("data: "), line
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


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


# -- request fields ----------------------------------------------------------------------------

# Each case changes the output against its baseline (checked offline), so a field the server
# dropped would show.
SAMPLING_CASES = {
    "temperature": dict(temperature=0.6),
    "top_p": dict(temperature=1.0, top_p=0.3),
    "top_k": dict(temperature=1.0, top_k=3),
    "min_p": dict(temperature=1.0, min_p=0.3),
    "repetition_penalty": dict(temperature=0.0, repetition_penalty=2.0),
    "presence_penalty": dict(temperature=0.0, presence_penalty=2.0),
    "frequency_penalty": dict(temperature=0.0, frequency_penalty=2.0),
}


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_sampling_fields_equal_offline(client, offline, case):
    fields = SAMPLING_CASES[case]
    temperature = fields["temperature"]
    candidates = random_prompts(8, 3, 8, seed=44)
    refs = offline(candidates, 16, seed=5, **fields)
    baselines = offline(candidates, 16, seed=5, temperature=1.0 if temperature > 0 else 0.0)
    changed = [i for i, (r, b) in enumerate(zip(refs, baselines)) if r.token_ids != b.token_ids]
    assert changed, "the case changes no output: a useless test"
    prompt, ref = candidates[changed[0]], refs[changed[0]]
    named = {k: v for k, v in fields.items() if k in ("temperature", "top_p", "presence_penalty", "frequency_penalty")}
    extra = {k: v for k, v in fields.items() if k not in named}  # vLLM's extensions
    resp = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, seed=5, extra_body=extra, **named)
    choice = resp.choices[0]
    assert ids_of(choice.text) == [t for t in ref.token_ids if t > 2]
    assert resp.usage.completion_tokens == len(ref.token_ids)
    assert choice.finish_reason == ref.finish_reason


def test_seed_repeats_and_n_choices(client, offline):
    def texts(seed, n=3):
        resp = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=12, temperature=1.0, n=n, seed=seed)
        assert [c.index for c in resp.choices] == list(range(n))
        return [c.text for c in resp.choices]

    first = texts(7)
    assert texts(7) == first  # the same seed, the same samples
    assert len(set(first)) == 3  # n distinct samples
    assert texts(8) != first and not set(texts(8)) & set(first)
    # unseeded requests differ from each other
    assert texts(None, 1) != texts(None, 1)
    # n per prompt: choice i * n + j is sample j of prompt i; greedy samples are all the greedy answer
    refs = offline(PROMPTS[:2], 8)
    resp = client.completions.create(model=NAME, prompt=PROMPTS[:2], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [refs[0].text] * 2 + [refs[1].text] * 2
    assert resp.usage.completion_tokens == 2 * sum(len(r.token_ids) for r in refs)


def test_stop_strings(served, client, http, offline):
    full = offline([PROMPTS[1]], 12)[0]
    assert full.finish_reason == "length"
    stop = words(full.token_ids[5:7])
    cut = full.text.find(stop)
    assert 0 < cut < len(full.text) - len(stop)
    want = full.text[:cut]  # the stop string and what follows are cut
    for stops in (stop, ["w99999 w99998", stop]):
        resp = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=stops)
        assert resp.choices[0].text == want and resp.choices[0].finish_reason == "stop"
        assert resp.usage.completion_tokens < 12
        streamed = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=stops,
                                             stream=True)
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"
    chat_full = offline([CHAT_IDS], 12)[0]
    chat_stop = words(chat_full.token_ids[4:6])
    resp = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0, stop=[chat_stop])
    assert resp.choices[0].message.content == chat_full.text[: chat_full.text.find(chat_stop)]
    assert resp.choices[0].finish_reason == "stop"
    assert_server_idle(served)  # a stop string aborts the rest of its request


def test_stop_token_ids(http, offline):
    full = offline([PROMPTS[2]], 10)[0]
    k = next(i for i in range(2, 10) if full.token_ids[i] not in full.token_ids[:i])
    r = http.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0,
                                           "stop_token_ids": [full.token_ids[k]]})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == k + 1  # up to and including the stop token
    assert body["choices"][0]["text"] == words(full.token_ids[: k + 1])


@pytest.fixture(scope="module")
def eos_prompt(offline):
    """A prompt whose greedy answer is EOS at once (found from one forward of many prompts)."""
    candidates = random_prompts(1024, 8, 8, seed=43)
    with torch.no_grad():
        logits = offline.model(torch.tensor(candidates)).logits
    row, pos = (logits.argmax(-1) == 2).nonzero()[0].tolist()
    prompt = candidates[row][: pos + 1]
    assert offline([prompt], 8)[0].token_ids == [2]
    return prompt


def test_ignore_eos_and_min_tokens(http, offline, eos_prompt):
    def complete(**fields):
        r = http.post("/v1/completions", json={"prompt": eos_prompt, "max_tokens": 8, "temperature": 0, **fields})
        assert r.status_code == 200, r.text
        return r.json()

    body = complete()
    assert body["choices"][0] == {"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}
    assert body["usage"]["completion_tokens"] == 1  # the EOS
    body = complete(ignore_eos=True)
    ref = offline([eos_prompt], 8, eos_token_id=None)[0]
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 8
    assert body["choices"][0]["text"] == ref.text
    body = complete(min_tokens=4)
    ref = offline([eos_prompt], 8, min_new_tokens=4)[0]
    assert len(ref.token_ids) >= 5
    assert body["choices"][0]["text"] == ref.text
    assert body["usage"]["completion_tokens"] == len(ref.token_ids)


def test_completion_logprobs(client, offline):
    ref = offline([PROMPTS[0]], 8, logprobs=3)[0]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                                    logprobs=3, stream=True))
            tokens = sum((c.choices[0].logprobs.tokens for c in chunks if c.choices[0].logprobs), [])
            token_logprobs = sum((c.choices[0].logprobs.token_logprobs for c in chunks if c.choices[0].logprobs), [])
            top = sum((c.choices[0].logprobs.top_logprobs for c in chunks if c.choices[0].logprobs), [])
        else:
            lp = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                           logprobs=3).choices[0].logprobs
            tokens, token_logprobs, top = lp.tokens, lp.token_logprobs, lp.top_logprobs
        assert tokens == [f"w{t}" for t in ref.token_ids]  # one entry per token
        assert len(token_logprobs) == len(top) == 8
        for token, logprob, alternatives, want in zip(tokens, token_logprobs, top, ref.logprobs):
            assert len(alternatives) == 3
            assert max(alternatives, key=alternatives.get) == token  # greedy: the top one
            assert logprob == pytest.approx(max(alternatives.values()))
            assert logprob == pytest.approx(want.logprob, abs=1e-4)
            assert list(alternatives) == [f"w{t}" for t, _ in want.top]


def test_chat_logprobs(client, offline):
    ref = offline([CHAT_IDS], 6, logprobs=2)[0]
    resp = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 6
    for entry, want in zip(content, ref.logprobs):
        assert entry.token == f"w{want.token_id}" and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy: the top one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(want.logprob, abs=1e-4)
    resp = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in resp.choices[0].logprobs.content] == [[]] * 6
    resp = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0)
    assert resp.choices[0].logprobs is None
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=1, stream=True))
    streamed = sum((c.choices[0].logprobs.content for c in chunks if c.choices and c.choices[0].logprobs), [])
    assert [e.token for e in streamed] == [e.token for e in content]


def test_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="w5", max_tokens=2)
    assert caught.value.status_code == 404
    for path, body in (("/v1/completions", {"prompt": "w5"}), ("/v1/chat/completions", {"messages": MESSAGES})):
        error = assert_error(http.post(path, json={**body, "model": "gpt-4", "max_tokens": 2}), 404, "model", "gpt-4")
        assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"


# -- bad requests ------------------------------------------------------------------------------

BAD_REQUESTS = {
    "max_tokens_0": ("/v1/completions", {"prompt": "w5", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    "max_tokens_negative": ("/v1/completions", {"prompt": "w5", "max_tokens": -3}, "max_tokens", "max_tokens"),
    "max_completion_tokens_0": ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 0},
                                "max_completion_tokens", "max_completion_tokens"),
    "prompt_too_long": ("/v1/completions", {"prompt": [5] * 600}, "prompt", "maximum context length is 512", "600"),
    "prompt_and_max_tokens_too_long": ("/v1/completions", {"prompt": [5] * 500, "max_tokens": 20}, "prompt",
                                       "maximum context length is 512", "520"),
    "messages_too_long": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5 " * 600}]},
                          "messages", "maximum context length"),
    "prompt_wrong_type": ("/v1/completions", {"prompt": 5}, "prompt", "prompt", "int"),
    "temperature_wrong_type": ("/v1/completions", {"prompt": "w5", "temperature": "hot"}, "temperature",
                               "temperature", "number"),
    "temperature_out_of_range": ("/v1/completions", {"prompt": "w5", "temperature": 3}, "temperature", "temperature"),
    "empty_prompt_str": ("/v1/completions", {"prompt": ""}, "prompt", "empty"),
    "empty_prompt_list": ("/v1/completions", {"prompt": []}, "prompt", "empty"),
    "empty_prompt_in_list": ("/v1/completions", {"prompt": [[5, 6], []]}, "prompt", "empty"),
    "no_messages": ("/v1/chat/completions", {"messages": []}, "messages", "messages"),
    "unknown_field": ("/v1/completions", {"prompt": "w5", "best_temperature": 1}, "best_temperature",
                      "Unrecognized request argument", "best_temperature"),
    "unknown_field_chat": ("/v1/chat/completions", {"messages": MESSAGES, "frobnicate": True}, "frobnicate",
                           "Unrecognized request argument"),
    "token_id_too_large": ("/v1/completions", {"prompt": [5, VOCAB]}, "prompt", f"token id {VOCAB}", "vocabulary"),
    "token_id_bool": ("/v1/completions", {"prompt": [5, True]}, "prompt", "prompt"),
    "token_id_float": ("/v1/completions", {"prompt": [[5.0, 6]]}, "prompt", "prompt"),
    "token_id_negative": ("/v1/completions", {"prompt": [[5, 6], [7, -1]]}, "prompt", "token id -1", "vocabulary"),
    "stop_token_id_too_large": ("/v1/completions", {"prompt": "w5", "stop_token_ids": [10**6], "min_tokens": 2},
                                "stop_token_ids", "10000", "vocabulary"),
    "n_0": ("/v1/completions", {"prompt": "w5", "n": 0}, "n", "n"),
    "logprobs_too_many": ("/v1/completions", {"prompt": "w5", "logprobs": 21}, "logprobs", "logprobs"),
    "top_logprobs_without_logprobs": ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, None,
                                      "top_logprobs needs logprobs"),
    "stream_options_without_stream": ("/v1/completions", {"prompt": "w5", "stream_options": {"include_usage": True}},
                                      None, "stream_options"),
    "unsupported_field": ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, None,
                          "tools is not supported"),
    "bad_role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "w5"}]}, "messages", "role"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_400_and_the_server_goes_on(served, http, greedy0, case):
    path, body, param, *fragments = BAD_REQUESTS[case]
    assert_error(http.post(path, json=body), 400, param, *fragments)
    assert_server_idle(served)
    assert_serves(http, greedy0)
    assert_server_idle(served)


def test_invalid_json_is_400(http):
    r = http.post("/v1/completions", content=b'{"prompt": "w5",', headers={"content-type": "application/json"})
    assert_error(r, 400, None, "JSON")


def test_bad_request_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=NAME, prompt="w5", max_tokens=2, extra_body={"frobnicate": 1})
    assert caught.value.status_code == 400 and "frobnicate" in caught.value.message


# -- metrics -----------------------------------------------------------------------------------


def read_metrics(http) -> dict[str, float]:
    r = http.get("/metrics")
    assert r.status_code == 200
    return {s.name: s.value for family in text_string_to_metric_families(r.text) for s in family.samples
            if not s.labels or s.labels.get("le") == "+Inf"}


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
    prompt = random_prompts(1, 40, 40, seed=77)[0]  # no other test sends it
    before = read_metrics(http)
    for _ in range(2):
        body = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
        assert http.post("/v1/completions", json=body).status_code == 200
    after = read_metrics(http)
    assert after["hf_cb_prefix_cache_queries_total"] - before["hf_cb_prefix_cache_queries_total"] == 80
    # the second request found the first one's two full pages (page size 16; its last token computed)
    assert after["hf_cb_prefix_cache_hits_total"] - before["hf_cb_prefix_cache_hits_total"] == 32


# -- clients that go away ----------------------------------------------------------------------


@pytest.fixture
def slow_steps(served):
    """Steps of >= 10 ms: a 480-token answer takes >= 4.8 s, so an abort shows."""
    def slow() -> None:
        time.sleep(0.01)

    served.online.add_listener(slow)
    yield
    served.online.remove_listener(slow)


def test_client_disconnecting_mid_stream_aborts(served, http, greedy0, slow_steps):
    engine = served.online.engine
    generated = engine.num_generated_tokens
    body = {"prompt": PROMPTS[0], "max_tokens": 480, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(base_url=served.url, timeout=30) as doomed:
        with doomed.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert sse_events([next(lines) for _ in range(6)])  # three chunks: it runs
            metrics = read_metrics(http)
            assert metrics["hf_cb_num_requests_running"] == 1 and metrics["hf_cb_kv_cache_usage_ratio"] > 0
            assert engine.manager.num_free_pages < engine.manager.num_pages
        # leaving the block closes the connection mid-stream
    assert_idle(served.online, timeout=3.0)
    assert engine.num_generated_tokens - generated < 240  # aborted, not run to its end
    assert served.server.bridge.streams == {}
    metrics = read_metrics(http)
    assert metrics["hf_cb_num_requests_running"] == 0 and metrics["hf_cb_kv_cache_usage_ratio"] == 0
    assert_serves(http, greedy0)


def test_client_disconnecting_before_the_response_aborts(served, http, greedy0, slow_steps):
    engine = served.online.engine
    generated = engine.num_generated_tokens
    body = {"prompt": PROMPTS[0], "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    with httpx.Client(base_url=served.url, timeout=httpx.Timeout(30, read=0.5)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", json=body)
    assert_idle(served.online, timeout=3.0)
    assert engine.num_generated_tokens - generated < 240
    assert served.server.bridge.streams == {}
    assert_serves(http, greedy0)


# -- API key -----------------------------------------------------------------------------------


def test_api_key(served, tok, offline):
    ref = offline([PROMPTS[0]], 4)[0]
    # A second front end over the same engine.
    with HTTPServer(served.online, tok, model_name=NAME, port=0, api_key="k", log_level="warning") as keyed:
        routes = [("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 4}),
                  ("POST", "/completions", {"prompt": PROMPTS[0], "max_tokens": 4}),
                  ("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4}),
                  ("POST", "/chat/completions", {"messages": MESSAGES, "max_tokens": 4})]
        with httpx.Client(base_url=keyed.url, timeout=30) as http:
            for method, path, body in routes:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
                    r = http.request(method, path, json=body, headers=headers)
                    error = assert_error(r, 401, None, "API key")
                    assert error["code"] == "invalid_api_key"
                r = http.request(method, path, json=body, headers={"Authorization": "Bearer k"})
                assert r.status_code == 200, (path, r.text)
            assert http.get("/health").status_code == 200  # for load balancers: no key
        with openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=4)
        with openai.OpenAI(base_url=keyed.url + "/v1", api_key="k", max_retries=0) as good:
            resp = good.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0)
            assert resp.choices[0].text == ref.text
    assert_idle(served.online)


# -- engine failures (a server of their own) ---------------------------------------------------


@pytest.fixture(scope="module")
def fragile(tok):
    """A server for the failure tests; the dead-loop test, which kills it, comes last."""
    served = start_server(tok)
    yield served
    stop_server(served)


def test_a_failing_step_is_500_and_the_next_request_succeeds(fragile, offline, monkeypatch):
    runner = fragile.online.engine.runner
    real, fail = runner.launch, []

    def launch(*args, **kwargs):
        if fail:
            fail.pop()
            raise RuntimeError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "launch", launch)
    ref = offline([PROMPTS[1]], 6)[0]
    body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0}
    with httpx.Client(base_url=fragile.url, timeout=30) as http:
        fail.append(1)
        r = http.post("/v1/completions", json=body)
        error = assert_error(r, 500, None, "simulated failure")
        assert error["type"] == "server_error"
        assert_idle(fragile.online)
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text
        # streamed: the failure is the stream's last event before [DONE]
        fail.append(1)
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]" and "simulated failure" in events[-2]["error"]["message"]
        assert_idle(fragile.online)
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text
        assert http.get("/health").status_code == 200


def test_a_dead_step_loop_is_503_at_once(fragile, monkeypatch):
    online = fragile.online
    # A bug outside any step (here: delivering outputs) kills the loop.
    monkeypatch.setattr(online, "_deliver", lambda updated: (_ for _ in ()).throw(KeyError("loop bug")))
    body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0}
    with httpx.Client(base_url=fragile.url, timeout=10) as http:
        error = assert_error(http.post("/v1/completions", json=body), 503, None, "loop bug")
        assert error["code"] == "engine_dead"
        assert not online.is_alive
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "dead" and "loop bug" in r.json()["error"]
        for request in (body, {**body, "stream": True}):
            start = time.monotonic()
            assert_error(http.post("/v1/completions", json=request), 503, None, "step loop")
            assert time.monotonic() - start < 5
        start = time.monotonic()
        assert_error(http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3}), 503, None)
        assert time.monotonic() - start < 5
    assert online.engine.manager.num_free_pages == online.engine.manager.num_pages
