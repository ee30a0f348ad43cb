"""``hf-cb serve`` as a process, under faults and on its way out: SIGTERM with streams in flight,
a front end that dies, a port already taken, an empty API key, the access log. Loopback only,
each bounded in time."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")  # the serve extra; the GPU machine may not have it
httpx = pytest.importorskip("httpx")

from conftest import DEVICE, chat_word_tokenizer, random_prompts, saved_model, tiny_model  # noqa: E402
from serve_process import SERVING_AT, hf_cb, serving  # noqa: E402
from server_support import sse_events  # noqa: E402

MODEL_ARGS = ["--dtype", "float32", "--device", DEVICE]
PROMPTS = random_prompts(4, 3, 8, seed=61)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_model(tiny_model("llama", seed=62), chat_word_tokenizer(), tmp_path_factory.mktemp("faults") / "m")


def wait_for(pattern: re.Pattern, log: Path, proc: subprocess.Popen, timeout: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout
    while (found := pattern.search(log.read_text())) is None:
        assert proc.poll() is None, f"hf-cb serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    return found


def test_sigterm_ends_streams_with_an_error_event_then_done(model_dir, tmp_path):
    """Streams in flight get a last event naming the shutdown and ``data: [DONE]``, waiting
    requests a 503; the server exits with status 0 (`serving` checks it) within its grace."""
    results: list = []
    started = threading.Event()

    def stream(url: str, i: int) -> None:
        body = {"prompt": PROMPTS[i], "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(lines)
            started.set()
            results.append(sse_events([first, *lines]))

    start = None
    with serving(str(model_dir), *MODEL_ARGS, "--max-num-seqs", "4", log=tmp_path / "serve.log") as url:
        threads = [threading.Thread(target=stream, args=(url, i)) for i in range(4)]
        for t in threads:
            t.start()
        assert started.wait(60)
        start = time.monotonic()
    assert time.monotonic() - start < 20
    for t in threads:
        t.join(30)
    assert len(results) == 4
    cut = [events for events in results if events[-2] != "[DONE]" and "error" in events[-2]]
    assert cut, "no stream was in flight at SIGTERM"
    for events in cut:
        assert events[-1] == "[DONE]"
        assert "shutting down" in events[-2]["error"]["message"]


def front_end_pid(pid: int) -> int:
    """The HTTP front end: ``hf-cb serve``'s child process."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_a_dead_front_end_stops_the_server_with_a_failure(model_dir, tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = hf_cb("serve", str(model_dir), *MODEL_ARGS, "--port", "0", popen=True, stdout=out,
                     stderr=subprocess.STDOUT)
    try:
        wait_for(SERVING_AT, log, proc)
        child = front_end_pid(proc.pid)
        os.kill(child, signal.SIGKILL)
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 1, log.read_text()[-2000:]
    assert f"the HTTP front end (pid {child}) ended with signal SIGKILL" in log.read_text()


def test_a_taken_port_fails_before_the_model_loads(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = hf_cb("serve", str(model_dir), *MODEL_ARGS, "--port", str(port))
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "KV pages" not in done.stderr + done.stdout  # no engine was built


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_empty_api_key_is_refused_at_start(model_dir, how):
    args, env = (["--api-key", ""], None) if how == "flag" else ([], {"HF_CB_API_KEY": ""})
    done = hf_cb("serve", str(model_dir), *MODEL_ARGS, *args, env=env)
    assert done.returncode != 0
    assert "the API key is empty" in done.stderr
    assert "KV pages" not in done.stderr + done.stdout


@pytest.mark.parametrize("disabled", [False, True], ids=["logged", "disabled"])
def test_one_access_log_line_per_request(model_dir, tmp_path, disabled):
    log = tmp_path / "serve.log"
    flags = ["--disable-log-requests"] if disabled else []
    with serving(str(model_dir), *MODEL_ARGS, *flags, log=log) as url, httpx.Client(base_url=url, timeout=60) as http:
        ok = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2},
                       headers={"X-Request-Id": "abc123"})
        bad = http.post("/v1/completions", content=json.dumps({"prompt": PROMPTS[0], "n": "2"}))
        assert (ok.status_code, bad.status_code) == (200, 400)
        assert ok.headers["x-request-id"] == "abc123" and len(bad.headers["x-request-id"]) == 32
    lines = [line for line in log.read_text().splitlines() if "hf_cb.access" in line or '"POST /v1/' in line]
    if disabled:
        assert lines == []
        return
    assert any('"POST /v1/completions" 200' in line and "request_id=abc123" in line for line in lines), lines
    assert any('"POST /v1/completions" 400' in line and f"request_id={bad.headers['x-request-id']}" in line
               for line in lines), lines
