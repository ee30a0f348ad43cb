"""The examples run as written."""

import runpy
from pathlib import Path


def test_quickstart_answers_with_the_default_model(capsys, converted, monkeypatch):
    monkeypatch.setenv("HF_CB_CACHE", str(converted.cache))  # the session's converted model
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "-> 'The capital of France is Paris.'" in out
    assert out.count("The capital of France is Paris.") >= 2  # the streamed answer too
    assert "<|im_end|>" not in out
