"""``hf-cb serve`` answers a Qwen3.5-shaped model (three Gated DeltaNet layers to one attention
layer) through the official OpenAI client: greedy completions equal stock `generate`, seeded
``n`` choices equal offline `generate_batch_continuous`, chat streams equal their non-streamed
answer. Loopback only, bounded in time."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")  # the serve extra; the GPU machine may not have it
openai = pytest.importorskip("openai")

from conftest import DEVICE, chat_word_tokenizer, random_prompts, reference_generate, saved_model  # noqa: E402
from serve_process import serving  # noqa: E402
from server_support import ids_of  # noqa: E402
from tiny_configs import tiny_model  # noqa: E402

PROMPTS = random_prompts(3, 4, 20, seed=91)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    _, model = tiny_model("qwen3_5_text", "Qwen3_5ForCausalLM")
    folder = saved_model(model, chat_word_tokenizer(), tmp_path_factory.mktemp("qwen3_5") / "m")
    return model, folder


def test_serve_answers_a_qwen3_5_shaped_model(qwen, tmp_path):
    model, folder = qwen
    assert model.config.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    refs = [reference_generate(model, p, max_new_tokens=10, do_sample=False, eos_token_id=None) for p in PROMPTS]
    offline = model.generate_batch_continuous([PROMPTS[0]], max_new_tokens=10, do_sample=True, temperature=1.0,
                                              top_k=0, top_p=1.0, num_return_sequences=3, seed=7, eos_token_id=None,
                                              progress=False)
    args = ["--dtype", "float32", "--device", DEVICE, "--served-model-name", "qwen"]
    with serving(str(folder), *args, log=tmp_path / "serve.log") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for prompt, ref in zip(PROMPTS, refs):
            resp = client.completions.create(model="qwen", prompt=prompt, max_tokens=10, temperature=0,
                                             extra_body={"ignore_eos": True})
            assert ids_of(resp.choices[0].text) == [t for t in ref if t > 2]
            assert resp.usage.completion_tokens == 10
        sampled = client.completions.create(model="qwen", prompt=PROMPTS[0], max_tokens=10, temperature=1.0, n=3,
                                            seed=7, extra_body={"ignore_eos": True})
        assert [ids_of(c.text) for c in sampled.choices] == [[t for t in o.token_ids if t > 2] for o in offline]
        messages = [{"role": "user", "content": "w5 w6 w7"}]
        whole = client.chat.completions.create(model="qwen", messages=messages, max_tokens=8, temperature=0)
        stream = client.chat.completions.create(model="qwen", messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == whole.choices[0].message.content and text
    assert "recurrent state: " in (tmp_path / "serve.log").read_text()  # the pool, at start-up
