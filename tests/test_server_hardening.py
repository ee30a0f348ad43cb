"""Adversarial requests against the server, on loopback, bounded in count and time. Each case
checks the status, OpenAI's error body naming the field, and that the server is unharmed
afterwards: healthy, idle (nothing running, no KV page in use) and answering a greedy request as
it did before."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")  # the serve extra; the GPU machine may not have it
httpx = pytest.importorskip("httpx")

from server_support import (  # noqa: E402
    PROMPTS,
    assert_error,
    assert_server_idle,
    assert_serves,
    read_metrics,
    sse_events,
    start_server,
    stop_server,
)

from hf_cb.server import ServerOptions  # noqa: E402

# /health, from another process (this one's own pauses would count otherwise), until stdin closes:
# prints the slowest answer in seconds and how many it got.
PROBE = """
import sys, threading, time, httpx
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
worst, n = 0.0, 0
with httpx.Client(base_url=sys.argv[1], timeout=5) as h:
    print("started", flush=True)
    while not done.is_set():
        start = time.perf_counter()
        assert h.get("/health").status_code == 200
        worst, n = max(worst, time.perf_counter() - start), n + 1
        time.sleep(0.005)
print(worst, n)
"""
LIMIT = 1 << 20  # a smaller body limit than the default, so that the big requests stay small
MAX_PROMPTS = 16


@pytest.fixture(scope="module")
def served(tok):
    served = start_server(tok, max_request_bytes=LIMIT, max_prompts=MAX_PROMPTS)
    yield served
    stop_server(served)


def assert_unharmed(served, http, greedy0) -> None:
    assert http.get("/health").status_code == 200
    assert_server_idle(served)
    metrics = read_metrics(http)
    assert metrics["hf_cb_num_requests_running"] == 0 and metrics["hf_cb_kv_cache_usage_ratio"] == 0
    assert_serves(http, greedy0)


# -- every field validated at the edge ------------------------------------------------------------

COMPLETION = {"prompt": PROMPTS[0], "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 4}
BAD = {  # path, body, param, fragments of the message
    "n_bool": ("/v1/completions", {**COMPLETION, "n": True}, "n", "valid integer"),
    "n_string": ("/v1/completions", {**COMPLETION, "n": "2"}, "n", "valid integer"),
    "n_float": ("/v1/completions", {**COMPLETION, "n": 2.0}, "n", "valid integer"),
    "max_tokens_string": ("/v1/completions", {**COMPLETION, "max_tokens": "8"}, "max_tokens", "valid integer"),
    "temperature_string": ("/v1/completions", {**COMPLETION, "temperature": "0.5"}, "temperature", "valid number"),
    "temperature_bool": ("/v1/completions", {**COMPLETION, "temperature": True}, "temperature", "valid number"),
    "logprobs_string": ("/v1/chat/completions", {**CHAT, "logprobs": "yes"}, "logprobs", "valid boolean"),
    "stream_string": ("/v1/completions", {**COMPLETION, "stream": "false"}, "stream", "valid boolean"),
    "seed_string": ("/v1/completions", {**COMPLETION, "seed": "7"}, "seed", "valid integer"),
    "seed_past_64_bits": ("/v1/completions", {**COMPLETION, "seed": 2**64}, "seed", "less than or equal to"),
    "seed_below_64_bits": ("/v1/completions", {**COMPLETION, "seed": -(2**63) - 1}, "seed", "greater than"),
    "top_k_past_the_vocabulary": ("/v1/completions", {**COMPLETION, "top_k": 2**64, "temperature": 1.0}, "top_k",
                                  "vocabulary size (512)"),
    "top_k_below_off": ("/v1/completions", {**COMPLETION, "top_k": -2}, "top_k", "greater than or equal to -1"),
    "stop_token_past_the_vocabulary": ("/v1/completions", {**COMPLETION, "stop_token_ids": [2**70]},
                                       "stop_token_ids", "outside the vocabulary"),
    "n_too_large": ("/v1/completions", {**COMPLETION, "n": 10**6}, "n", "less than or equal to 128"),
    "logprobs_too_many": ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs", "less than or equal"),
    "lone_surrogate_prompt": ("/v1/completions", {"prompt": "w5 \ud800 w6"}, "prompt", "lone UTF-16 surrogate"),
    "lone_surrogate_in_a_list": ("/v1/completions", {"prompt": ["w5", "\udfff"]}, "prompt", "prompt[1]",
                                 "surrogate"),
    "lone_surrogate_stop": ("/v1/completions", {**COMPLETION, "stop": "\ud83d"}, "stop", "surrogate"),
    "lone_surrogate_chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]},
                            "messages", "messages[0].content", "surrogate"),
    "not_json": ("/v1/completions", b"{prompt: 1", None, "not valid JSON"),
    "not_an_object": ("/v1/completions", b"[1, 2]", None, "must be a JSON object"),
    "infinity": ("/v1/completions", b'{"prompt": [5], "temperature": Infinity}', "temperature", "finite number"),
    "too_many_prompts": ("/v1/completions", {"prompt": ["w5"] * (MAX_PROMPTS + 1)}, "prompt",
                         f"at most {MAX_PROMPTS} per request"),
    "too_many_id_prompts": ("/v1/completions", {"prompt": [[5]] * 50_000}, "prompt", "50000 prompts"),
    "unknown_model": ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, "model", "gpt-4", "does not exist"),
}


def post(http, path, body):
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"content-type": "application/json"})
    # json.dumps keeps lone surrogates as \ud800 escapes (as a client's JSON encoder sends them)
    return http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("case", BAD)
def test_bad_field_is_refused_at_the_edge(served, http, greedy0, case):
    path, body, param, *fragments = BAD[case]
    status = 404 if case == "unknown_model" else 400
    assert_error(post(http, path, body), status, param, *fragments)
    assert_unharmed(served, http, greedy0)


def test_the_connection_survives_a_refused_request(served, greedy0):
    """A lone surrogate once made a 500 and uvicorn dropped the keep-alive connection."""
    with httpx.Client(base_url=served.url, timeout=30) as http:
        post(http, "/v1/completions", {"prompt": "\ud800"})
        first = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})
        assert first.status_code == 200 and first.json()["choices"][0]["text"] == greedy0.text
        assert first.extensions["network_stream"] is not None


NULLABLE = {
    "/v1/completions": {**COMPLETION, "temperature": 0},
    "/v1/chat/completions": {**CHAT, "temperature": 0},
}
NULLS = {  # OpenAI's nullable fields: null means the default
    "/v1/completions": ["n", "stream", "presence_penalty", "frequency_penalty", "echo", "logprobs", "seed", "stop",
                        "top_p", "user", "suffix", "best_of", "stream_options", "logit_bias", "min_p"],
    "/v1/chat/completions": ["n", "stream", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs",
                             "seed", "stop", "tools", "tool_choice", "response_format", "top_k",
                             "metadata", "store"],
}


@pytest.mark.parametrize("path", NULLS)
def test_null_means_the_default(served, http, path):
    body = NULLABLE[path]
    expected = http.post(path, json=body)
    assert expected.status_code == 200, expected.text
    got = http.post(path, json={**body, **{name: None for name in NULLS[path]}})
    assert got.status_code == 200, got.text
    text = (lambda r: r.json()["choices"][0].get("text") or r.json()["choices"][0]["message"]["content"])
    assert text(got) == text(expected)


def test_a_tiny_temperature_is_greedy(served, http, greedy0):
    """1e-300 is inside (0, 2] but 0 in float32: below vLLM's epsilon it samples the argmax."""
    r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 1e-300})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy0.text
    assert_unharmed(served, http, greedy0)


def test_models_retrieve(served, http):
    assert http.get("/v1/models/tiny-llama").json()["id"] == "tiny-llama"
    assert_error(http.get("/v1/models/gpt-4"), 404, "model", "gpt-4")


def test_docs_are_off_by_default(http):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert http.get(path).status_code == 404


# -- big requests do not block the others ---------------------------------------------------------

def test_big_requests_are_refused_while_others_keep_their_pace(served, http, greedy0):
    """A body over the limit (a 413 from its length, before anything is read), a chunked one
    (counted as it arrives) and 50,000 prompts (a 400 before any is tokenized): /health answers
    within 100 ms throughout and a stream beside them goes on."""
    prober = subprocess.Popen([sys.executable, "-c", PROBE, served.url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert prober.stdout.readline().strip() == "started"

    def chunks():
        for _ in range(300):
            yield b" " * 4096
        yield b"{}"

    stream_body = {"prompt": PROMPTS[1], "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
    try:
        with http.stream("POST", "/v1/completions", json=stream_body) as streamed:
            lines = streamed.iter_lines()
            first = next(lines)  # the stream has started
            huge = b'{"prompt": "' + b"w5 " * ((20 << 20) // 3) + b'"}'  # 20 MB
            start = time.perf_counter()
            assert_error(http.post("/v1/completions", content=huge), 413, None, "larger than", str(LIMIT))
            assert time.perf_counter() - start < 5
            assert_error(http.post("/v1/completions", content=chunks()), 413, None, "larger than")
            assert_error(post(http, "/v1/completions", {"prompt": [[5]] * 50_000}), 400, "prompt", "50000")
            events = sse_events([first, *lines])
    finally:
        worst, probes = map(float, prober.communicate(timeout=30)[0].split())
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert probes > 10 and worst < 0.1, f"/health took {worst * 1e3:.0f} ms"
    assert_unharmed(served, http, greedy0)


# -- auth -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(tok):
    served = start_server(tok, api_key="sesame", protect_metrics=True, enable_docs=True)
    with httpx.Client(base_url=served.url, timeout=30) as http:
        yield served, http
    stop_server(served)


@pytest.mark.parametrize("header", [None, "Bearer wrong", "sesame", "Basic sesame", "Bearer", "Bearer sesame2"])
def test_without_the_key_is_401_before_the_body_is_read(keyed, greedy0, header):
    served, http = keyed
    headers = {"content-type": "application/json", **({"authorization": header} if header else {})}
    for path in ("/v1/completions", "/completions", "/v1/chat/completions", "/v1/models", "/metrics"):
        r = http.post(path, content=b"{not json", headers=headers) if "completions" in path else \
            http.get(path, headers=headers)
        error = assert_error(r, 401, None, "Incorrect API key")
        assert error["code"] == "invalid_api_key"
    big = http.post("/v1/completions", content=b"x" * (8 << 20), headers=headers)  # over the limit, no key
    assert big.status_code == 401


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_scheme_is_case_insensitive(keyed, greedy0, scheme):
    served, http = keyed
    headers = {"authorization": f"{scheme} sesame"}
    r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}, headers=headers)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy0.text
    assert http.get("/metrics", headers=headers).status_code == 200


def test_health_and_enabled_docs_need_no_key(keyed):
    _, http = keyed
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/openapi.json").json()["paths"]["/v1/completions"]["post"]["requestBody"]


def test_an_empty_key_is_refused():
    with pytest.raises(ValueError, match="API key is empty"):
        ServerOptions(api_key="")
    with pytest.raises(ValueError, match="API key is empty"):
        ServerOptions(api_key="  ")
