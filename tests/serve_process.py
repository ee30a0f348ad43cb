"""``python -m hf_cb ...`` as a subprocess, and ``hf-cb serve`` run until its health check answers
(loopback only, bounded in time), for the CLI tests."""

from __future__ import annotations

import contextlib
import os
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def serving(*args: str, log: Path, env: dict | None = None, timeout: float = 120) -> Iterator[str]:
    """``hf-cb serve ARGS --port P`` until it answers /health; yields its URL; then SIGTERM: it
    must end with status 0, and its port close (the HTTP front end, a child process, ends too)."""
    port = free_port()
    with open(log, "w") as out:
        proc = hf_cb("serve", *args, "--port", str(port), env=env, popen=True, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
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
