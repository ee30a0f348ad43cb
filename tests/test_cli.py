"""The ``hf-cb`` command line, run as ``python -m hf_cb`` in subprocesses: ``generate`` over a
JSONL file and ``serve`` on a tiny model saved with ``save_pretrained`` (its answers equal
offline `generate_batch_continuous`), and ``serve`` of the embedded default model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")  # the serve extra; the GPU machine may not have it

from conftest import DEVICE, QUESTION, chat_word_tokenizer, random_prompts, saved_model, tiny_model, words
from serve_process import hf_cb, serving

from hf_cb.cli.startup import add_engine_args, engine_config_from

ROOT = Path(__file__).resolve().parents[1]
SEED = 51
PROMPTS = random_prompts(4, 3, 8, seed=52)
MESSAGES = [{"role": "user", "content": words(PROMPTS[1])}]
CHAT_IDS = PROMPTS[1] + [3]
MODEL_ARGS = ["--dtype", "float32", "--device", DEVICE]


@pytest.fixture(scope="module")
def tok():
    return chat_word_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=SEED)


@pytest.fixture(scope="module")
def model_dir(model, tok, tmp_path_factory):
    return saved_model(model, tok, tmp_path_factory.mktemp("cli") / "tiny-llama")


def offline(model, tok, prompts, max_tokens, temperature=0.0, **kwargs):
    if temperature > 0:  # the server's defaults for what the request leaves out
        kwargs = {"top_k": 0, "top_p": 1.0, **kwargs, "do_sample": True, "temperature": temperature}
    else:
        kwargs = {**kwargs, "do_sample": False}
    return model.generate_batch_continuous(prompts, max_new_tokens=max_tokens, tokenizer=tok, progress=False, **kwargs)


# -- hf-cb generate ----------------------------------------------------------------------------


def test_generate_answers_every_line_in_order(model, tok, model_dir, tmp_path):
    full = offline(model, tok, [PROMPTS[2]], 12)[0]
    stop = words(full.token_ids[5:7])
    lines = [
        {"prompt": words(PROMPTS[0]), "max_tokens": 8, "temperature": 0},
        {"messages": MESSAGES, "max_tokens": 6},
        {"prompt": PROMPTS[2], "max_tokens": 12, "stop": [stop]},
        {"prompt": words(PROMPTS[3]), "max_tokens": 9, "temperature": 1.0, "seed": 3, "n": 2},
        {"prompt": PROMPTS[3]},  # --max-tokens and --temperature give its defaults
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines[:2]) + "\n\n"  # a blank line is skipped
                      + "\n".join(json.dumps(line) for line in lines[2:]) + "\n")
    out = tmp_path / "out.jsonl"
    done = hf_cb("generate", str(model_dir), *MODEL_ARGS, "--input", str(source), "--output", str(out),
                 "--max-tokens", "5", "--temperature", "0", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == len(lines)
    for result in results:
        assert {"text", "finish_reason", "prompt_tokens", "completion_tokens"} <= set(result), result

    def check(result, ref, prompt_len):
        assert result["text"] == ref.text and result["finish_reason"] == ref.finish_reason
        assert result["prompt_tokens"] == prompt_len and result["completion_tokens"] == len(ref.token_ids)

    check(results[0], offline(model, tok, [PROMPTS[0]], 8)[0], len(PROMPTS[0]))
    check(results[1], offline(model, tok, [CHAT_IDS], 6)[0], len(CHAT_IDS))
    assert results[2]["text"] == full.text[: full.text.find(stop)] and results[2]["finish_reason"] == "stop"
    samples = offline(model, tok, [PROMPTS[3]], 9, temperature=1.0, seed=3, num_return_sequences=2)
    assert [c["text"] for c in results[3]["choices"]] == [s.text for s in samples]
    assert results[3]["text"] == samples[0].text and samples[0].text != samples[1].text
    assert results[3]["completion_tokens"] == sum(len(s.token_ids) for s in samples)
    check(results[4], offline(model, tok, [PROMPTS[3]], 5)[0], len(PROMPTS[3]))


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "w5", "max_tokens": 0}', "line 3: max_tokens"),
    ('{"prompt": "w5", "max_tokens": 4', "line 3: not JSON"),
], ids=["bad_value", "not_json"])
def test_generate_names_the_bad_line(model_dir, tmp_path, bad, message):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "w5 w6", "max_tokens": 2}\n{"messages": [{"role": "user", "content": "w7"}]}\n'
                      + bad + "\n")
    out = tmp_path / "out.jsonl"
    done = hf_cb("generate", str(model_dir), *MODEL_ARGS, "--input", str(source), "--output", str(out),
                 "--no-progress")
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not out.exists()  # every line is checked before anything is generated


# -- hf-cb serve -------------------------------------------------------------------------------


def test_serve_answers_then_ends(model, tok, model_dir, tmp_path):
    ref = offline(model, tok, [PROMPTS[0]], 7)[0]
    chat_ref = offline(model, tok, [CHAT_IDS], 7)[0]
    with serving(str(model_dir), *MODEL_ARGS, "--served-model-name", "tiny", log=tmp_path / "serve.log",
                 env={"HF_CB_API_KEY": "sesame"}) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 7, "temperature": 0}
            assert http.post("/v1/completions", json=body).status_code == 401  # $HF_CB_API_KEY is required
            http.headers["Authorization"] = "Bearer sesame"
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny"]
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == ref.text
            r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 7,
                                                        "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == chat_ref.text


@pytest.fixture(scope="module")
def default_server(converted, tmp_path_factory):
    """``hf-cb serve`` with no model: the embedded default, from the session's converted cache."""
    log = tmp_path_factory.mktemp("default") / "serve.log"
    with serving(log=log, env={"HF_CB_CACHE": str(converted.cache)}) as url:
        yield url
    assert "converting" not in log.read_text()  # the cache was used, not converted again


def test_serve_default_model_knows_paris(default_server):
    with httpx.Client(base_url=default_server, timeout=120) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["SmolLM2-135M-Instruct"]
        r = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer


@pytest.mark.parametrize(("flags", "expected"), [([], None), (["--compile"], True), (["--compile", "false"], False)])
def test_optional_engine_booleans(flags, expected):
    """``bool | None`` fields: absent leaves the choice to the engine; a bare flag means true."""
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from(parser.parse_args(flags))
    assert config.compile is expected and config.decode_tensor_cores is None
