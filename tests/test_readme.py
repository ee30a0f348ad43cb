"""The README's quick start runs as written and prints what the README says it prints."""

import re
import runpy
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def quick_start() -> tuple[str, str]:
    """(the Quick start's Python block, the output block after 'It prints:')."""
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = re.search(r"It prints:\n\n```\n(.*?)```", section, re.S).group(1)
    return code, printed


def test_quick_start_runs_as_written(converted, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_CB_CACHE", str(converted.cache))  # the session's converted default model
    code, printed = quick_start()
    script = tmp_path / "quick_start.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="__main__")
    assert capsys.readouterr().out == printed
