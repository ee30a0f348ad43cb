"""``hf-cb generate`` checks its input before it loads the model, and names every bad line.

In process (``hf_cb.cli.main.main``), with ``load_model`` replaced by one that records its calls
and gives a tiny model: no default model, no disk, and a test can tell whether a load happened.
The subprocess tests in test_cli.py run the real command end to end."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("fastapi")  # the serve extra

from conftest import DEVICE, chat_word_tokenizer, tiny_model, words

from hf_cb.cli.main import main
from hf_cb.entrypoints import model_loader
from hf_cb.entrypoints.model_loader import DEFAULT_MODEL_NAME, LoadedModel

GOOD = '{"prompt": "w5 w6", "max_tokens": 2}'


@pytest.fixture
def tokenizer():
    return chat_word_tokenizer()


@pytest.fixture
def loads(monkeypatch, tokenizer) -> list[str | None]:
    """``load_model`` replaced by one that gives a tiny Llama and ``tokenizer``; the MODEL of
    each call is recorded in the list returned."""
    calls = []

    def load(model=None, **kwargs):
        calls.append(model)
        return LoadedModel(tiny_model("llama"), tokenizer, DEFAULT_MODEL_NAME if model is None else model)

    monkeypatch.setattr(model_loader, "load_model", load)
    return calls


def generate(capsys, *args: str) -> tuple[int, str, list[str]]:
    """``hf-cb generate ARGS``: its exit status, its stdout and its ``hf-cb generate:`` lines."""
    try:
        main(["generate", *args, "--device", DEVICE, "--dtype", "float32", "--no-progress"])
        status = 0
    except SystemExit as stop:
        status = stop.code
    out, err = capsys.readouterr()
    return status, out, [line for line in err.splitlines() if line.startswith("hf-cb generate:")]


def write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


def missing_input(tmp_path):
    missing = tmp_path / "missing.jsonl"
    return missing, "out", f"cannot read the input file {missing}: No such file or directory"


def folder_input(tmp_path):
    return tmp_path, "out", f"cannot read the input file {tmp_path}: Is a directory"


def latin1_input(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"prompt": "caf\xe9"}\n')
    return source, "out", f"the input file {source} is not UTF-8 text: 'utf-8' codec can't decode byte 0xe9"


def output_in_no_folder(tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [GOOD])
    return source, "no/out", f"cannot write the output file {tmp_path}/no/out: no folder {tmp_path}/no"


@pytest.mark.parametrize("case", [missing_input, folder_input, latin1_input, output_in_no_folder])
def test_unusable_file_fails_fast_without_loading(tmp_path, capsys, loads, case):
    source, out, problem = case(tmp_path)
    status, _, errors = generate(capsys, "--input", str(source), "--output", str(tmp_path / out))
    assert status == 2
    assert len(errors) == 1 and errors[0].startswith(f"hf-cb generate: {problem}"), errors
    assert loads == []


def test_every_bad_line_is_named_before_loading(tmp_path, capsys, loads):
    source = write_lines(tmp_path / "in.jsonl", [
        GOOD,
        '{"prompt": "w5", "max_tokens": 4',
        "[1, 2]",
        '{"prompt": "w5", "n": 0}',
        '{"prompt": "w5", "colour": "red"}',
        "",  # blank lines are skipped, and still counted
        '{"messages": [{"role": "user", "content": "w7"}], "model": "gpt-4"}',
        f'{{"prompt": "w5", "model": "{DEFAULT_MODEL_NAME}"}}',  # no MODEL: the default's name is served
        '{"messages": [{"role": "user", "content": "w7"}], "temperature": 3}',
    ])
    out = tmp_path / "out.jsonl"
    status, _, errors = generate(capsys, "--input", str(source), "--output", str(out))
    assert status == 1
    # The server's wording (test_server_failures.py): its 400s, and its 404 for another model.
    assert errors == [
        "hf-cb generate: line 2: not JSON (Expecting ',' delimiter at column 33)",
        "hf-cb generate: line 3: expected a JSON object, got list",
        "hf-cb generate: line 4: n: Input should be greater than or equal to 1",
        "hf-cb generate: line 5: Unrecognized request argument supplied: colour",
        "hf-cb generate: line 7: The model `gpt-4` does not exist.",
        "hf-cb generate: line 9: temperature: Input should be less than or equal to 2",
    ]
    assert loads == [] and not out.exists()


def test_served_name_is_model_as_given(tmp_path, capsys, loads):
    source = write_lines(tmp_path / "in.jsonl", [f'{{"prompt": "w5", "model": "{DEFAULT_MODEL_NAME}"}}'])
    status, _, errors = generate(capsys, "org/tiny", "--input", str(source), "--output", str(tmp_path / "out"))
    assert status == 1
    assert errors == [f"hf-cb generate: line 1: The model `{DEFAULT_MODEL_NAME}` does not exist."]
    assert loads == []


def too_long(context: int, prompt: int, completion: int) -> str:
    """The server's 400 for a prompt and completion longer than the context."""
    return (f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt + completion} tokens ({prompt} in the prompt, {completion} in the completion). "
            "Please reduce the length of the prompt or completion.")


def test_lines_that_need_the_model_are_all_named_after_loading(tmp_path, capsys, loads, tokenizer):
    tokenizer.chat_template = None
    source = write_lines(tmp_path / "in.jsonl", [
        GOOD,
        json.dumps({"prompt": list(range(3, 63)), "max_tokens": 8}),
        '{"messages": [{"role": "user", "content": "w7"}]}',
        json.dumps({"prompt": words(list(range(3, 73)))}),  # --max-tokens 5 is its max_tokens
    ])
    out = tmp_path / "out.jsonl"
    status, _, errors = generate(capsys, "--input", str(source), "--output", str(out), "--max-tokens", "5",
                                 "--max-model-len", "64")
    assert status == 1
    assert errors == [
        f"hf-cb generate: line 2: {too_long(64, 60, 8)}",
        "hf-cb generate: line 3: this model has no chat template; use /v1/completions",
        # Text is tokenized up to one token past the context: the length beyond is not counted.
        "hf-cb generate: line 4: This model's maximum context length is 64 tokens. However, the prompt has "
        "more than 64 tokens. Please reduce its length.",
    ]
    assert loads == [None] and not out.exists()  # loaded once, and nothing generated


def test_output_to_stdout_leaves_it_open(tmp_path, capsys, loads):
    source = write_lines(tmp_path / "in.jsonl", [
        '{"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": true}',
        '{"messages": [{"role": "user", "content": "w7"}], "model": "tiny", "max_tokens": 2, "ignore_eos": true}',
    ])
    status, out, errors = generate(capsys, "tiny", "--input", str(source), "--output", "-")
    assert (status, errors) == (0, [])
    assert not sys.stdout.closed  # a tensor-parallel rank flushes it on its way out
    results = [json.loads(line) for line in out.splitlines()]
    assert [(r["prompt_tokens"], r["completion_tokens"], r["finish_reason"]) for r in results] == [
        (3, 3, "length"), (2, 2, "length")]  # the chat template: "w7 w3"
