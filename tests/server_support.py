"""What the server tests share: a tiny Llama with the word tokenizer served by `HTTPServer`
over an `OnlineEngine`, the official ``openai`` client and raw HTTP (httpx) against it, and
offline `generate_batch_continuous` on a second model built with the same seed as the oracle
(the served model's engine belongs to its `OnlineEngine`). With the word tokenizer a text is the
words of its token ids, so texts compare token for token. The fixtures are module-scoped: each
test module that uses them gets a server of its own.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
from conftest import chat_word_tokenizer, keep_engine, random_prompts, tiny_model, words

import hf_cb
from hf_cb.entrypoints.online import OnlineEngine

if TYPE_CHECKING:
    import httpx

# Loaded by every test session (`pytest_plugins` in conftest.py), also where the serve and test
# extras are missing (the GPU machine): what needs them is imported where it is used, and the
# server test modules skip themselves without them.

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


def start_server(tok, **options) -> SimpleNamespace:
    """A server for a module's tests: its model is kept from the per-test release (`stop_server`).
    ``options``: `ServerOptions` fields."""
    from hf_cb.server import HTTPServer, ServerOptions

    model = keep_engine(tiny_model("llama", seed=SEED))
    online = OnlineEngine(model, tokenizer=tok)
    try:
        server = HTTPServer(online, tok, model_name=NAME, port=0, log_level="warning",
                            options=ServerOptions(**options)).start()
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
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(served):
    httpx = pytest.importorskip("httpx")
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


def read_metrics(http) -> dict[str, float]:
    """The server's /metrics samples by name (histograms: their +Inf bucket)."""
    from prometheus_client.parser import text_string_to_metric_families

    r = http.get("/metrics")
    assert r.status_code == 200
    return {s.name: s.value for family in text_string_to_metric_families(r.text) for s in family.samples
            if not s.labels or s.labels.get("le") == "+Inf"}
