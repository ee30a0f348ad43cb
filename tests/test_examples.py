"""The examples run as written."""

import runpy
from pathlib import Path


def test_quickstart_runs(capsys):
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "length 16" in out or "stop" in out
