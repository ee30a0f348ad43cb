"""What goes wrong around the server: bad requests (400 with an OpenAI error body, the server
going on), clients that go away (their requests aborted, no page left), the API key, and a
failing or dead engine step loop."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import VOCAB
from server_support import (
    MESSAGES,
    NAME,
    PROMPTS,
    assert_error,
    assert_idle,
    assert_server_idle,
    assert_serves,
    read_metrics,
    sse_events,
    start_server,
    stop_server,
)

# The test extra installs both; a machine without them (the GPU one) skips the module.
openai = pytest.importorskip("openai")
HTTPServer = pytest.importorskip("hf_cb.server").HTTPServer

# -- bad requests ------------------------------------------------------------------------------

BAD_REQUESTS = {
    "max_tokens_0": ("/v1/completions", {"prompt": "w5", "max_tokens": 0}, "max_tokens", "max_tokens must be at least 1"),
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


POISON = [9, 9, 9, 9, 4]  # a prompt whose every step fails


def test_a_request_whose_steps_fail_is_500_and_the_others_keep_their_answers(fragile, offline, monkeypatch):
    runner = fragile.online.engine.runner
    real = runner.launch

    def launch(batch, prev):
        if any(s.prompt_ids == POISON for s in batch.seqs):
            raise RuntimeError("simulated failure")
        return real(batch, prev)

    monkeypatch.setattr(runner, "launch", launch)
    ref = offline([PROMPTS[1]], 30)[0]
    good = {"prompt": PROMPTS[1], "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    bad = {"prompt": POISON, "max_tokens": 6, "temperature": 0}
    with httpx.Client(base_url=fragile.url, timeout=30) as http, ThreadPoolExecutor(1) as pool:
        beside = pool.submit(lambda: http.post("/v1/completions", json=good))
        error = assert_error(http.post("/v1/completions", json=bad), 500, None, "simulated failure")
        assert error["type"] == "server_error"
        assert beside.result().json()["choices"][0]["text"] == ref.text
        # streamed: the failure is the stream's last event before [DONE]
        with http.stream("POST", "/v1/completions", json={**bad, "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]" and "simulated failure" in events[-2]["error"]["message"]
        assert_idle(fragile.online)
        assert http.post("/v1/completions", json=good).json()["choices"][0]["text"] == ref.text


def test_a_step_that_fails_once_fails_no_request(fragile, offline, monkeypatch):
    runner = fragile.online.engine.runner
    real, fail = runner.launch, [1]

    def launch(*args, **kwargs):
        if fail:
            fail.pop()
            raise RuntimeError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "launch", launch)
    ref = offline([PROMPTS[1]], 6)[0]
    with httpx.Client(base_url=fragile.url, timeout=30) as http:
        r = http.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text and not fail
    assert_idle(fragile.online)


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
