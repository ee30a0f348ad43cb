"""lm-evaluation-harness on hf_cb, against lm-eval's own ``hf`` backend on the same model
(float32; loglikelihoods within 1e-4, generations equal): the in-process ``hf_cb`` model, and
``local-completions`` against ``hf-cb serve`` (echo, remote tokenizer), on three small tasks
from local JSON data (no hub): multiple choice, generate-until and rolling loglikelihood."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")

from conftest import DEVICE, byte_tokenizer, saved_model, tiny_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from serve_process import hf_cb as hf_cb_process  # noqa: E402
from serve_process import serving  # noqa: E402

from hf_cb.entrypoints.lm_eval_model import HFCBLM  # noqa: E402

TASKS = ["hfcb_mc", "hfcb_gen", "hfcb_ppl"]
QUESTIONS = [("the quick brown fox", ["jumps", "sleeps", "runs away"], 0),
             ("hello world, the capital of", ["France", "the dog", "Paris is"], 1),
             ("the lazy dog", ["jumps over", "is lazy", "hello"], 2),
             ("over the", ["lazy dog", "quick fox", "world"], 0)]
TEXTS = ["the quick brown fox jumps over the lazy dog " * 3, "hello world, the capital of France is Paris"]


def write_tasks(folder) -> None:
    """Three task configs over JSONL files in ``folder`` (lm-eval's ``json`` dataset builder)."""
    rows = {"mc": [{"question": q, "choices": c, "label": label} for q, c, label in QUESTIONS],
            "gen": [{"question": q, "answer": c[label]} for q, c, label in QUESTIONS],
            "ppl": [{"text": t} for t in TEXTS]}
    for name, data in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))

    def config(name: str, body: str) -> str:
        return (f"task: hfcb_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {folder / (name + '.jsonl')}\ntest_split: test\n{body}")

    (folder / "mc.yaml").write_text(config("mc", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                                            'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
                                            "metric_list:\n  - metric: acc\n"))
    (folder / "gen.yaml").write_text(config("gen", 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
                                             'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: [","]\n'
                                             "  max_gen_toks: 6\n  do_sample: false\n"
                                             "metric_list:\n  - metric: exact_match\n"))
    (folder / "ppl.yaml").write_text(config("ppl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                                             'doc_to_target: "{{text}}"\n'
                                             "metric_list:\n  - metric: word_perplexity\n"
                                             "  - metric: bits_per_byte\n"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval")
    write_tasks(folder)
    tok = byte_tokenizer()
    model = tiny_model("llama", seed=23)
    return model, tok, folder, TaskManager(include_path=str(folder))


def evaluate(lm, manager) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, log_samples=True,
                                   bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)


@pytest.fixture(scope="module")
def reference(setup):
    model, tok, _, manager = setup
    return evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=4, device=DEVICE), manager)


def responses(result: dict, task: str) -> list:
    return [s["resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def assert_same(result: dict, reference: dict) -> None:
    for task in ("hfcb_mc", "hfcb_ppl"):
        for got, want in zip(responses(result, task), responses(reference, task), strict=True):
            for (g,), (w,) in zip(got, want, strict=True):  # loglikelihood: (value, is_greedy); rolling: value
                g, w = (g, w) if isinstance(g, (list, tuple)) else ((g,), (w,))
                assert abs(float(g[0]) - float(w[0])) < 1e-4 and tuple(g[1:]) == tuple(w[1:])
    assert responses(result, "hfcb_gen") == responses(reference, "hfcb_gen")
    for task in TASKS:
        # Aggregates from those: perplexities exponentiate the 1e-6 differences of the sums.
        got, want = result["results"][task], reference["results"][task]
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-5, abs=1e-6) if isinstance(value, float) else value), key


def test_the_hf_cb_model_equals_lm_evals_hf_backend(setup, reference):
    model, tok, _, manager = setup
    result = evaluate(HFCBLM(pretrained=model, tokenizer=tok, device=DEVICE, max_num_seqs=8), manager)
    assert_same(result, reference)
    assert reference["results"]["hfcb_gen"]["exact_match,none"] >= 0  # the task ran
    import hf_cb

    assert hf_cb.get_engine(model).stats.steps > 0  # the engine did the work


def test_local_completions_against_hf_cb_serve(setup, reference, tmp_path):
    model, tok, folder, manager = setup
    model_dir = saved_model(model, tok, tmp_path / "m")
    with serving(str(model_dir), "--dtype", "float32", "--device", DEVICE, "--served-model-name", "tiny",
                 log=tmp_path / "serve.log") as url:
        lm = lm_eval.api.registry.get_model("local-completions")(
            model="tiny", base_url=url + "/v1/completions", tokenizer_backend="remote", tokenized_requests=True,
            num_concurrent=1, max_retries=1, max_length=512)
        result = evaluate(lm, manager)
    assert_same(result, reference)


def test_hf_cb_eval_command(setup, tmp_path):
    model, tok, folder, _ = setup
    model_dir = saved_model(model, tok, tmp_path / "m")
    done = hf_cb_process("eval", "--model_args", f"pretrained={model_dir},dtype=float32", "--device", DEVICE,
                         "--tasks", "hfcb_mc", "--include_path", str(folder), "--limit", "4",
                         env={"HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hfcb_mc" in done.stdout and "acc" in done.stdout
