"""The model-coverage sweep (tests/model_sweep.py) in CI: no architecture may fail other than the
known ones, and docs/models.md must have a row for every architecture of the installed Transformers.

The whole sweep (200 architectures in 5.25) takes under two minutes on 2 CPU cores with 2 jobs, so CI
runs all of it. ``HF_CB_SWEEP=sample`` runs only `SAMPLE`, one or two architectures of each kind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import model_sweep

# Architectures that fail today (model_type -> the issue), as the last full sweep found them. A newly
# failing architecture fails the test; a fixed one fails it too, as a reminder to remove it here
# (and to regenerate docs/models.md).
KNOWN_FAILING: dict[str, str] = {}

# One or two architectures of each kind, for HF_CB_SWEEP=sample; none of them may be skipped.
SAMPLE: dict[str, str] = {
    "llama": "Llama-like",
    "qwen3": "Llama-like, q/k norms",
    "mistral": "sliding window",
    "gemma3_text": "sliding and full layers",
    "gemma2": "logit soft-capping",
    "mixtral": "MoE",
    "qwen3_moe": "MoE",
    "deepseek_v3": "MLA",
    "gpt_oss": "attention sinks",
    "llama4_text": "chunked attention",
    "gemma4_text": "Gemma 4 (per-layer head dims, K/V sharing)",
    "qwen3_next": "hybrid (linear attention)",
    "qwen3_5_text": "hybrid (linear attention)",
    "mamba2": "SSM",
    "whisper": "decoder of an encoder-decoder",
    "blenderbot": "decoder of an encoder-decoder",
    "gpt2": "own attention code",
    "falcon": "own attention code",
    "bloom": "own attention code (ALiBi)",
    "dots3_note_text": "per-layer heterogeneous config (known failing)",
}

ROOT = Path(__file__).resolve().parents[1]
JOBS = 2
TIMEOUT_S = 900  # the whole sweep, all architectures


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> list[dict]:
    """The sweep's records, from a fresh process (the sweep forks one process per architecture; a
    fork of the pytest process, which has run other tests' threads, is not safe)."""
    out = tmp_path_factory.mktemp("sweep") / "sweep.json"
    command = [sys.executable, str(ROOT / "tests" / "model_sweep.py"), "--jobs", str(JOBS), "--json", str(out)]
    if os.environ.get("HF_CB_SWEEP") == "sample":
        command += ["--only", ",".join(SAMPLE)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    print(done.stdout[-3000:])
    assert done.returncode == 0, f"the sweep exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())


def _describe(record: dict) -> str:
    where = f" (raised in {record['where']})" if record.get("where") else ""
    return f"{record['model_type']} ({record['cls']}): {record['reason']}{where}"


def test_no_architecture_fails_but_the_known_ones(sweep):
    swept = {r["model_type"] for r in sweep}
    failing = {r["model_type"]: r for r in sweep if r["status"] == "failing"}
    known = {m: why for m, why in KNOWN_FAILING.items() if m in swept}
    new = [_describe(failing[m]) for m in sorted(failing.keys() - known.keys())]
    fixed = sorted(known.keys() - failing.keys())
    message = []
    if new:
        message.append("newly failing architectures:\n  " + "\n  ".join(new))
    if fixed:
        message.append(
            "these no longer fail: remove them from KNOWN_FAILING (tests/test_model_sweep.py) and regenerate "
            f"docs/models.md ({model_sweep.COMMAND}):\n  "
            + "\n  ".join(f"{m}: now {next(r['status'] for r in sweep if r['model_type'] == m)}" for m in fixed)
        )
    assert not message, "\n".join(message)


def test_the_sample_runs_on_stock_transformers(sweep):
    """Every kind of architecture is exercised: none of the sample is skipped (which would mean the
    tiny config, or stock generate, broke rather than hf_cb)."""
    skipped = [_describe(r) for r in sweep if r["model_type"] in SAMPLE and r["status"] == "skipped"]
    assert not skipped, "skipped:\n  " + "\n  ".join(skipped)


def test_sweep_covers_every_architecture(sweep):
    if os.environ.get("HF_CB_SWEEP") == "sample":
        pytest.skip("HF_CB_SWEEP=sample runs only the sample")
    assert [r["model_type"] for r in sweep] == list(model_sweep.architectures())


def test_docs_models_md_lists_every_architecture():
    """docs/models.md has one row per architecture of the installed Transformers (its statuses are
    not checked: they change with the code, and the command at its top regenerates them)."""
    rows = model_sweep.markdown_model_types(model_sweep.MARKDOWN.read_text())
    installed = list(model_sweep.architectures())
    duplicates = sorted({m for m in rows if rows.count(m) > 1})
    missing = [m for m in installed if m not in rows]
    extra = [m for m in rows if m not in installed]
    assert not (duplicates or missing or extra), (
        f"docs/models.md is out of date with Transformers' causal-LM architectures: missing {missing}, "
        f"no longer in Transformers {extra}, duplicated {duplicates}; regenerate it: {model_sweep.COMMAND}"
    )


def test_known_failing_and_sample_name_installed_architectures():
    installed = model_sweep.architectures()
    unknown = sorted((KNOWN_FAILING.keys() | SAMPLE.keys()) - installed.keys())
    assert not unknown, f"not causal-LM architectures of the installed Transformers: {unknown}"
