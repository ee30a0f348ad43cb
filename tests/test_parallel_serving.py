"""``hf-cb serve --tensor-parallel-size 2`` and ``--data-parallel-size 2`` on CPU (gloo; hf-cb
starts the ranks itself): answers equal offline generation, SIGTERM ends every rank. And the
router of data-parallel serving: in one process, two engines behind one front end both work."""

from __future__ import annotations

import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")  # the serve extra
import httpx  # noqa: E402
from conftest import random_prompts, saved_model, tiny_model, word_tokenizer  # noqa: E402
from serve_process import hf_cb, serving  # noqa: E402

from hf_cb.entrypoints.online import OnlineEngine  # noqa: E402
from hf_cb.server import HTTPServer  # noqa: E402
from hf_cb.server.http_server import join  # noqa: E402
from hf_cb.server.router import Router  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED = 71
PROMPTS = random_prompts(6, 3, 20, seed=72)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=SEED, device="cpu")


@pytest.fixture(scope="module")
def model_dir(model, tok, tmp_path_factory):
    return saved_model(model, tok, tmp_path_factory.mktemp("parallel_serving") / "llama")


def complete_all(url: str, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Every prompt's greedy completion, the requests all at once."""
    def one(prompt):
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


@pytest.mark.parametrize("args", [("--tensor-parallel-size", "2"), ("--data-parallel-size", "2")],
                         ids=["tp2", "dp2"])
def test_parallel_serve_answers_as_offline(model, tok, model_dir, tmp_path, args):
    expected = [c.text for c in model.generate_batch_continuous(PROMPTS, tokenizer=tok, max_new_tokens=10,
                                                                do_sample=False)]
    with serving(str(model_dir), "--dtype", "float32", *args, log=tmp_path / "serve.log",
                 env={"CUDA_VISIBLE_DEVICES": ""}) as url:
        assert complete_all(url, PROMPTS, 10) == expected
    survivors = subprocess.run(["pgrep", "-f", f"hf_cb serve {model_dir}"], capture_output=True, text=True).stdout
    assert not survivors.strip(), "a rank outlived hf-cb serve"


def test_a_failed_rank_is_named_and_ends_the_others(tmp_path):
    done = hf_cb("serve", str(tmp_path / "no-such-model"), "--tensor-parallel-size", "2",
                 env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode != 0
    # Both ranks fail to load; the first to end is named with its status, the other is ended.
    assert re.search(r"hf-cb: rank [01] of 2 ended with status 1\n", done.stderr), done.stderr[-3000:]


def test_two_engines_behind_one_front_end_both_serve(model, tok):
    """What ``--data-parallel-size`` runs, in one process: a second engine joins the front end."""
    twin = tiny_model("llama", seed=SEED, device="cpu")  # the same weights
    expected = [c.text for c in model.generate_batch_continuous(PROMPTS, tokenizer=tok, max_new_tokens=24,
                                                                do_sample=False)]
    first, second = OnlineEngine(model, tokenizer=tok), OnlineEngine(twin, tokenizer=tok)
    try:
        with HTTPServer(first, tok, model_name="tiny", port=0, log_level="warning") as server:
            bridge = join(second, *server.engine_address)
            deadline = time.monotonic() + 60
            while second.engine.num_generated_tokens == 0:  # until the join has landed
                assert time.monotonic() < deadline, "no request reached the second engine"
                assert complete_all(server.url, PROMPTS, 24) == expected
            assert first.engine.num_generated_tokens > 0
            bridge.close()
    finally:
        first.shutdown()
        second.shutdown()


class _Engine:
    def __init__(self, outstanding: int, running: int = 0, usage: float = 0.0):
        self.outstanding, self.running, self.usage = outstanding, running, usage
        self.is_alive, self.error, self.max_model_len, self.vocab_size = True, None, 64, 512
        self.submitted: list = []

    def outstanding_tokens(self) -> int:
        return self.outstanding

    def submit(self, prompt_ids, params, seed=None, **kwargs):
        self.submitted.append(prompt_ids)
        self.outstanding += len(prompt_ids) + params.max_new_tokens

    def check_request(self, prompt_ids, params) -> None:
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise ValueError("too long")

    def num_requests(self) -> tuple[int, int]:
        return self.running, 1

    def kv_cache_usage(self) -> float:
        return self.usage


def test_router_sends_each_request_to_the_least_loaded_engine():
    from hf_cb.sampling.params import SamplingParams

    a, b = _Engine(100, running=2, usage=0.5), _Engine(0, running=1, usage=0.1)
    router = Router(a)
    router.submit([1] * 10, SamplingParams(40))  # only a
    router.add(b)
    for _ in range(3):  # b: 0 -> 50 -> (a has 150) 100 -> 150
        router.submit([1] * 10, SamplingParams(40))
    assert (len(a.submitted), len(b.submitted)) == (1, 3)
    router.submit([1] * 10, SamplingParams(40))  # equal: the first
    assert len(a.submitted) == 2
    assert router.num_requests() == (3, 2) and router.kv_cache_usage() == pytest.approx(0.3)
    b.max_model_len = 32  # every replica must be able to run a request
    with pytest.raises(ValueError):
        router.check_request([1] * 10, SamplingParams(40))
    b.is_alive = False
    assert not router.is_alive
