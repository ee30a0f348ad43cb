"""Each request field the server honours (sampling, seeds and ``n``, stop strings and ids,
``ignore_eos``/``min_tokens``, logprobs, the model name), against offline
`generate_batch_continuous` (see server_support.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts, words
from server_support import CHAT_IDS, MESSAGES, NAME, PROMPTS, assert_error, assert_server_idle, ids_of

# The test extra installs both; a machine without them (the GPU one) skips the module.
openai = pytest.importorskip("openai")
pytest.importorskip("hf_cb.server")

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
