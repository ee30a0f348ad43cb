"""``python -m hf_cb ...`` as a subprocess, and ``hf-cb serve`` run until its health check answers
(loopback only, bounded in time), for the CLI tests."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def hf_cb(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    """``python -m hf_cb ARGS`` (run to its end unless ``popen=True``), offline."""
    cmd = [sys.executable, "-m", "hf_cb", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    if kwargs.pop("popen", False):
        return subprocess.Popen(cmd, cwd=ROOT, env=env, **kwargs)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, **kwargs)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


SERVING_AT = re.compile(r"serving .* at (http://127\.0\.0\.1:(\d+))/v1")


@contextlib.contextmanager
def serving(*args: str, log: Path, env: dict | None = None, timeout: float = 120) -> Iterator[str]:
    """``hf-cb serve ARGS --port 0`` until it answers /health; yields its URL; then SIGTERM: it
    must end with status 0, and its port close (the HTTP front end, a child process, ends too).
    The server binds the port itself and the URL is read from its log: a port picked free here
    and bound later by the server could be taken in between (by gloo's sockets: twice in 13 runs
    of two ranks)."""
    with open(log, "w") as out:
        proc = hf_cb("serve", *args, "--port", "0", env=env, popen=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while (found := SERVING_AT.search(log.read_text())) is None:
            assert proc.poll() is None, f"hf-cb serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"hf-cb serve did not start in time:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        url, port = found.group(1), int(found.group(2))
        while True:
            assert proc.poll() is None, f"hf-cb serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"hf-cb serve did not answer in time:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"hf-cb serve did not end on SIGTERM:\n{log.read_text()[-3000:]}")
    assert status == 0, log.read_text()[-3000:]
    deadline = time.monotonic() + 15
    while port_open(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not port_open(port), "the HTTP front end outlived hf-cb serve"
