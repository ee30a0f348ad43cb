"""Scoring prompts through the server, as lm-eval's ``local-completions`` does for every
multiple-choice and perplexity task: ``echo`` with ``logprobs`` (the legacy completions format),
``echo`` with ``max_tokens: 0``, vLLM's ``prompt_logprobs``, ``return_token_ids`` and
``return_tokens_as_token_ids``, and the tokenizer routes; against offline
`generate_batch_continuous(prompt_logprobs=...)` (see server_support.py)."""

from __future__ import annotations

import math

import pytest
from conftest import random_prompts, words
from server_support import NAME, assert_error, assert_server_idle, sse_events

openai = pytest.importorskip("openai")
pytest.importorskip("hf_cb.server")

PROMPTS = random_prompts(4, 3, 12, seed=47)


def lm_eval_scores(body: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """What lm-eval's ``LocalCompletionsAPI.parse_logprobs`` reads from a response: the sum of
    the continuation's log-probabilities (``token_logprobs[ctxlen:-1]``: the echoed tokens after
    the context, less the one generated) and whether each was the most likely."""
    out = []
    for choice, ctxlen in zip(sorted(body["choices"], key=lambda c: c["index"]), ctxlens):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        out.append((sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))))
    return out


def test_lm_eval_loglikelihood_payload(http, offline):
    """lm-eval's payload: token-id prompts (context + continuation), echo, logprobs 1, max_tokens 1."""
    ref = offline(PROMPTS, 1, prompt_logprobs=1)
    r = http.post("/v1/completions", json={"model": NAME, "prompt": PROMPTS, "temperature": 0, "max_tokens": 1,
                                            "logprobs": 1, "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    body = r.json()
    for prompt, choice, want in zip(PROMPTS, body["choices"], ref):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + 1 == len(lp["token_logprobs"]) == len(lp["text_offset"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1 : len(prompt)] == [e.logprob for e in want.prompt_logprobs[1:]]
        assert [list(t.values()) for t in lp["top_logprobs"][1 : len(prompt)]] == [
            [e.top[0][1]] for e in want.prompt_logprobs[1:]]
        assert choice["text"] == words(prompt) + want.text  # the prompt, then the completion
    ctxlens = [2] * len(PROMPTS)
    expected = [(sum(e.logprob for e in w.prompt_logprobs[2:]), all(e.rank == 1 for e in w.prompt_logprobs[2:]))
                for w in ref]
    got = lm_eval_scores(body, ctxlens)
    assert [g[1] for g in got] == [e[1] for e in expected]
    assert all(math.isclose(g[0], e[0], abs_tol=1e-6) for g, e in zip(got, expected))
    assert_server_idle_after(http)


def assert_server_idle_after(http) -> None:
    r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200


def test_echo_with_zero_max_tokens_scores_only(client, offline, served):
    ref = offline(PROMPTS[:2], 1, prompt_logprobs=2)
    resp = client.completions.create(model=NAME, prompt=PROMPTS[:2], max_tokens=0, echo=True, logprobs=2)
    for prompt, choice, want in zip(PROMPTS, resp.choices, ref):
        assert choice.text == words(prompt)
        assert choice.logprobs.token_logprobs == [None] + [e.logprob for e in want.prompt_logprobs[1:]]
        assert all(len(t) == 2 for t in choice.logprobs.top_logprobs[1:])
    assert resp.usage.completion_tokens == 0 and resp.usage.prompt_tokens == sum(map(len, PROMPTS[:2]))
    echo_only = client.completions.create(model=NAME, prompt=words(PROMPTS[0]), max_tokens=0, echo=True)
    assert echo_only.choices[0].text == words(PROMPTS[0]) and echo_only.choices[0].logprobs is None
    assert_server_idle(served)


def test_zero_max_tokens_needs_echo(http):
    r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 0})
    assert_error(r, 400, "max_tokens", "max_tokens must be at least 1")


def test_vllm_prompt_logprobs_and_token_ids(http, offline):
    ref = offline(PROMPTS[:1], 3, prompt_logprobs=2)[0]
    r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0,
                                            "prompt_logprobs": 2, "return_token_ids": True, "logprobs": 0,
                                            "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["prompt_token_ids"] == PROMPTS[0] and choice["token_ids"] == ref.token_ids
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in ref.token_ids]
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(PROMPTS[0])
    for entry, want in zip(entries[1:], ref.prompt_logprobs[1:]):
        assert entry[str(want.token_id)]["logprob"] == want.logprob and entry[str(want.token_id)]["rank"] == want.rank
        for rank, (token, logprob) in enumerate(want.top, start=1):
            if token != want.token_id:
                assert entry[str(token)] == {"logprob": logprob, "rank": rank, "decoded_token": f"token_id:{token}"}


def test_streamed_echo_starts_with_the_prompt(http, offline):
    ref = offline(PROMPTS[1:2], 4)[0]
    body = {"prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0, "echo": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert texts[0].startswith(words(PROMPTS[1])) and "".join(texts) == words(PROMPTS[1]) + ref.text


def test_tokenizer_routes(http, tok):
    text = words(PROMPTS[2])
    r = http.post("/tokenize", json={"model": NAME, "prompt": text, "add_special_tokens": False,
                                     "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == PROMPTS[2] and body["count"] == len(PROMPTS[2]) and body["max_model_len"] > 0
    assert body["token_strs"] == text.split()
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()
    assert chat["tokens"] == tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
    assert http.post("/detokenize", json={"tokens": PROMPTS[2]}).json() == {"prompt": text}
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    assert info["tokenizer_class"] == type(tok).__name__
    assert_error(http.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens", "outside the vocabulary")
    assert_error(http.post("/tokenize", json={"prompt": "a", "messages": []}), 400, None, "exactly one")
    assert_error(http.post("/tokenize", json={"prompt": "a", "model": "other"}), 404, "model")
