#!/usr/bin/env python
"""Model-coverage sweep: every causal-LM architecture of the installed Transformers, built tiny
with random weights, run through hf_cb and compared with stock ``generate``.

    python tests/model_sweep.py [--only a,b] [--json out.json] [--markdown docs/models.md] [--jobs N]

For each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``:

1. its config is built tiny (`tiny_config`: a generic shrinker over the config's attributes and
   sub-configs, then `OVERRIDES`, one small table of per-architecture fixes) and the class the
   mapping names is built from it on CPU in float32, seeded, with ``initializer_range`` 0.2;
2. the reference: stock ``model.generate`` on each of three prompts (5, 17 and 33 token ids),
   batch size 1, no padding, 12 greedy new tokens, no EOS;
3. hf_cb: ``model.generate_batch_continuous(prompts, max_new_tokens=12, do_sample=False,
   eos_token_id=None, progress=False)``, then ``hf_cb.release(model)``.

Each architecture gets a status:

- ``exact``: hf_cb's tokens equal the reference's, token for token;
- ``refused``: hf_cb raised ``ModelNotSupported`` (the reason is its message);
- ``failing``: hf_cb raised anything else (type, message, where), crashed or hung, or its tokens
  differ from the reference's (a wrong-output bug);
- ``skipped``: stock Transformers itself cannot run the tiny model (the config cannot be built
  tiny, the model cannot be built, it cannot generate, or stock ``generate`` raises). Everything
  up to and including the reference runs before hf_cb is called, so a skip never hides an hf_cb
  failure.

Each architecture runs in its own process, forked from this one after the imports, with a
timeout: a crash or a hang in one does not stop the sweep.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("hf_cb") is None:  # run as a script without hf_cb installed: this checkout's
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from model_checkpoints import CHECKPOINTS  # noqa: E402 - after the path above
from tiny_configs import (  # noqa: E402 - after the path above
    EXPERTS,
    HEADS,
    HIDDEN,
    INIT,
    MIN_LAYERS,
    NEW_TOKENS,
    PROMPT_LENGTHS,
    TIMEOUT_S,
    VOCAB,
    WINDOW,
    architectures,
    prompts_for,
    tiny_model,
)


def _hf_cb():
    """hf_cb, imported on first use (the shrinker does not need it)."""
    return importlib.import_module("hf_cb")


DATE = "2026-12-08"
COMMAND = "python tests/model_sweep.py --jobs 2 --markdown docs/models.md"
MARKDOWN = ROOT / "docs" / "models.md"
STATUSES = ("exact", "refused", "failing", "skipped")


# -- one architecture ---------------------------------------------------------------------------

@dataclass
class Record:
    model_type: str
    cls: str
    status: str = ""
    reason: str = ""
    seconds: float = 0.0
    error_type: str = ""  # failing / refused / skipped on an exception: its type
    where: str = ""  # failing: the innermost hf_cb frame (file:line in function)
    raised_at: str = ""  # failing / skipped: the frame that raised
    params: int = 0  # the tiny model's parameter count
    layers: int = 0
    min_gap: float | None = None  # the smallest top-2 logit gap over the reference's greedy steps (ties: ~0)
    reference: list = field(default_factory=list)  # the reference's new tokens, per prompt
    extra: dict = field(default_factory=dict)


def _frame(frame: traceback.FrameSummary) -> str:
    path = Path(frame.filename)
    for base in (ROOT, Path(transformers.__file__).parents[1], Path(torch.__file__).parents[1]):
        try:
            path = path.relative_to(base)
            break
        except ValueError:
            continue
    return f"{path}:{frame.lineno} in {frame.name}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _describe(error: BaseException) -> tuple[str, str, str]:
    """(type, raised at, innermost hf_cb frame) of an exception."""
    frames = traceback.extract_tb(error.__traceback__)
    raised_at = _frame(frames[-1]) if frames else ""
    hf_cb_dir = str(Path(sys.modules["hf_cb"].__file__).parent) if "hf_cb" in sys.modules else str(ROOT / "hf_cb")
    ours = [f for f in frames if f.filename.startswith(hf_cb_dir)]
    return type(error).__name__, raised_at, _frame(ours[-1]) if ours else ""


def _reference(model, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    tokens, logits = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
        new = out.sequences[0, len(prompt):].tolist()
        if len(new) != NEW_TOKENS:
            raise RuntimeError(f"stock generate returned {len(new)} new tokens for {NEW_TOKENS} asked, without EOS")
        tokens.append(new)
        logits.append(torch.stack([step[0] for step in out.logits]) if out.logits else None)
    return tokens, logits


def _top2_gap(logits: torch.Tensor) -> float:
    top = logits.float().topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def _gap(logits: torch.Tensor | None, step: int) -> str:
    if logits is None:
        return ""
    top = logits[step].float().topk(2).values
    return f"; generate's top-2 logit gap there {float(top[0] - top[1]):.3g}"


def run_one(model_type: str, class_name: str | None = None, stage: Callable[[str], None] = lambda s: None) -> Record:
    """Sweep one architecture in this process."""
    class_name = class_name or architectures()[model_type]
    record = Record(model_type, class_name)
    start = time.perf_counter()
    try:
        _run(record, stage)
    finally:
        record.seconds = round(time.perf_counter() - start, 2)
    return record


def _skip(record: Record, what: str, error: BaseException) -> None:
    record.status = "skipped"
    record.error_type, record.raised_at, _ = _describe(error)
    record.reason = f"{what}: {type(error).__name__}: {_first_line(error)}"


def _run(record: Record, stage: Callable[[str], None]) -> None:
    stage("config")
    try:
        config, model = tiny_model(record.model_type, record.cls)
    except Exception as error:
        _skip(record, "the tiny model cannot be built", error)
        return
    record.params = sum(p.numel() for p in model.parameters())
    text = config.get_text_config(decoder=True)
    record.layers = getattr(text, "num_hidden_layers", 0) or 0
    if not model.can_generate():
        record.status = "skipped"
        record.reason = f"{type(model).__name__} cannot generate (can_generate() is False)"
        return
    prompts = prompts_for(config)
    stage("reference")
    try:
        expected, logits = _reference(model, prompts)
    except Exception as error:
        _skip(record, "stock generate raises", error)
        return
    record.reference = expected
    gaps = [_top2_gap(lg) for lg in logits if lg is not None]
    record.min_gap = round(min(gaps), 4) if gaps else None
    stage("hf_cb")
    hf_cb = _hf_cb()
    try:
        completions = model.generate_batch_continuous(
            prompts, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, progress=False
        )
    except hf_cb.ModelNotSupported as error:
        record.status = "refused"
        record.error_type = type(error).__name__
        record.reason = str(error).strip()
        return
    except Exception as error:
        record.status = "failing"
        record.error_type, record.raised_at, record.where = _describe(error)
        cause = error.__cause__ or error.__context__
        record.reason = f"{type(error).__name__}: {_first_line(error)}"
        if cause is not None:
            record.extra["cause"] = f"{type(cause).__name__}: {_first_line(cause)} (at {_describe(cause)[1]})"
        return
    finally:
        try:
            hf_cb.release(model)
        except Exception as error:  # reported, but the outputs still count
            record.extra["release"] = f"{type(error).__name__}: {_first_line(error)}"
    got = [list(c.token_ids) for c in completions]
    diffs = []
    for prompt, want, have, lg in zip(prompts, expected, got, logits):
        if want != have:
            step = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
            if step < min(len(want), len(have)):
                diffs.append(f"{len(prompt)}-token prompt: new token {step} is {have[step]}, generate's "
                             f"{want[step]}{_gap(lg, step)}")
            else:
                diffs.append(f"{len(prompt)}-token prompt: {len(have)} new tokens, generate's {len(want)}")
    if diffs:
        record.status = "failing"
        record.error_type = "WrongOutput"
        record.reason = f"wrong output ({len(diffs)} of {len(prompts)} prompts differ from generate): " + "; ".join(diffs)
        record.extra["hf_cb"] = got
        return
    # Outside a step the model is untouched: stock generate gives the same tokens after the engine is released.
    try:
        again, _ = _reference(model, prompts[:1])
    except Exception as error:
        record.status = "failing"
        record.error_type, record.raised_at, record.where = _describe(error)
        record.reason = (f"stock generate raises after hf_cb.release: {type(error).__name__}: {_first_line(error)}")
        return
    if again[0] != expected[0]:
        record.status = "failing"
        record.error_type = "ModelChanged"
        record.reason = f"stock generate gives other tokens after hf_cb.release: {again[0]}, before {expected[0]}"
        return
    record.status = "exact"


# -- the sweep: one forked process per architecture ---------------------------------------------

def _child(model_type: str, class_name: str, conn, threads: int, log_path: str) -> None:
    # The models' own prints and warnings go to a file: the sweep's output stays one line per
    # architecture, and a crash's last words are kept for its record.
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    torch.set_num_threads(threads)
    try:
        record = run_one(model_type, class_name, stage=lambda s: conn.send(("stage", s)))
        conn.send(("record", asdict(record)))
    except BaseException as error:  # noqa: BLE001 - anything that escapes run_one
        conn.send(("error", f"{type(error).__name__}: {_first_line(error)}"))
    finally:
        conn.close()


def _tail(path: str, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _lost(model_type: str, class_name: str, stage: str, why: str, seconds: float, log_path: str = "") -> Record:
    """The record of a process that died or hung: an hf_cb failure once hf_cb was called."""
    record = Record(model_type, class_name, seconds=round(seconds, 2))
    tail = _tail(log_path) if log_path else ""
    if tail:
        record.extra["output_tail"] = tail
        why = f"{why} (last output: {tail.splitlines()[-1][:200]})"
    kind = "Timeout" if why.startswith("timed out") else "Crash"
    if stage == "hf_cb":
        record.status, record.error_type = "failing", kind
        record.reason = f"{why} inside generate_batch_continuous"
    else:
        record.status, record.error_type = "skipped", kind
        record.reason = f"{why} before hf_cb ran (stage: {stage}): stock Transformers cannot run it"
    return record


def sweep(model_types: list[str] | None = None, jobs: int = 1, timeout: float = TIMEOUT_S,
          log: Callable[[str], None] | None = None) -> list[Record]:
    """Sweep ``model_types`` (all by default), ``jobs`` at a time; records in the mapping's order."""
    arch = architectures()
    todo = list(model_types or arch)
    unknown = [m for m in todo if m not in arch]
    if unknown:
        raise ValueError(f"not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: {unknown}")
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    _hf_cb()  # imported once here, before the forks
    ctx = multiprocessing.get_context("fork")
    logs = tempfile.mkdtemp(prefix="hf_cb_sweep_")
    pending = list(todo)
    running: dict[Any, dict[str, Any]] = {}  # conn -> state
    records: dict[str, Record] = {}

    def finish(state: dict[str, Any], record: Record) -> None:
        records[record.model_type] = record
        if log:
            log(f"[{len(records):3d}/{len(todo)}] {record.model_type:28s} {record.status:8s} {record.seconds:6.1f}s "
                f"{record.reason[:150]}")

    while pending or running:
        while pending and len(running) < jobs:
            model_type = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            log_path = os.path.join(logs, f"{model_type}.log")
            process = ctx.Process(target=_child, args=(model_type, arch[model_type], child, threads, log_path),
                                  daemon=True)
            process.start()
            child.close()
            running[parent] = {"model_type": model_type, "process": process, "start": time.perf_counter(),
                               "stage": "start", "log": log_path}
        now = time.perf_counter()
        next_deadline = min(s["start"] + timeout for s in running.values())
        ready = wait(list(running), timeout=max(0.0, next_deadline - now))
        for conn in ready:
            state = running[conn]
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                kind, payload = "eof", None
            if kind == "stage":
                state["stage"] = payload
                continue
            state["process"].join(timeout=30)
            seconds = time.perf_counter() - state["start"]
            model_type = state["model_type"]
            if kind == "record":
                record = Record(**payload)
            elif kind == "error":
                record = _lost(model_type, arch[model_type], state["stage"], f"the process raised {payload}", seconds,
                               state["log"])
            else:
                code = state["process"].exitcode
                why = f"the process died (exit code {code})" if code is None or code >= 0 else f"the process died of signal {-code}"
                record = _lost(model_type, arch[model_type], state["stage"], why, seconds, state["log"])
            del running[conn]
            conn.close()
            finish(state, record)
        now = time.perf_counter()
        for conn, state in list(running.items()):
            if now - state["start"] > timeout:
                state["process"].kill()
                state["process"].join()
                del running[conn]
                conn.close()
                finish(state, _lost(state["model_type"], arch[state["model_type"]], state["stage"],
                                    f"timed out after {timeout:.0f} s", now - state["start"], state["log"]))
    shutil.rmtree(logs, ignore_errors=True)
    return [records[m] for m in todo]


# -- the report ---------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def markdown(records: list[Record]) -> str:
    """docs/models.md: the explanation, then one row per architecture, and nothing after the table."""
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    lines = [
        "# Model coverage",
        "",
        f"Generated by `{COMMAND}` (tests/model_sweep.py); do not edit it by hand, run the command again.",
        f"Generated on {DATE}, with Transformers {transformers.__version__} and torch {torch.__version__}.",
        "",
        (f"Every architecture of Transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` ({len(records)}) is built tiny "
         f"from its config with seeded random weights (hidden size {HIDDEN}, {MIN_LAYERS} layers or the fewest that "
         f"keep its layer pattern, {HEADS} heads, {EXPERTS} experts, vocabulary {VOCAB}, windows and chunks of "
         f"{WINDOW}, initializer range {INIT}, untied output embeddings) on CPU in float32, as the class the mapping "
         f"names. Three prompts of {', '.join(map(str, PROMPT_LENGTHS))} token ids get {NEW_TOKENS} greedy new tokens "
         "without EOS from stock `generate` (one prompt at a time, no padding) and from "
         "`generate_batch_continuous` (the three together); each architecture runs in its own process, with a "
         "timeout."),
        "",
        ("- `exact`: hf_cb's tokens equal `generate`'s, token for token, and stock `generate` still gives them "
         "after `hf_cb.release`;"),
        "- `refused`: hf_cb refuses the model with `ModelNotSupported` (its reason is shown);",
        ("- `failing`: hf_cb raises another error (shown with the hf_cb frame that raised it), crashes or hangs, or "
         "its tokens differ from `generate`'s;"),
        "- `skipped`: stock Transformers itself cannot run the tiny model (why is shown).",
        "",
        ("Models whose layers keep a recurrent state (hybrid linear-attention and state-space models) run "
         "batch-shaped steps over a per-sequence state pool (docs/architecture.md); tests/test_state_models.py "
         "checks them further under chunked prefill, preemption, `n` samples and aborts."),
        "",
        "Counts: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES) + f", of {len(records)}.",
        "",
        "| model_type | class | status | reason | popular checkpoints |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        reason = r.reason if r.status != "exact" else ""
        if r.status == "failing" and r.where:
            reason += f" (raised in `{r.where}`)"
        checkpoints = ", ".join(f"`{c}`" for c in CHECKPOINTS.get(r.model_type, []))
        lines.append(f"| `{r.model_type}` | `{r.cls}` | {r.status} | {_cell(reason)} | {checkpoints} |")
    return "\n".join(lines) + "\n"


def markdown_model_types(text: str) -> list[str]:
    """The model_type of each row of a docs/models.md table."""
    return re.findall(r"^\| `([^`]+)` \| `[^`]+` \|", text, flags=re.MULTILINE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated model_types (default: all)")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--markdown", help="write the docs/models.md table here")
    parser.add_argument("--jobs", type=int, default=1, help="architectures run at once (default 1)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per architecture")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    only = [m.strip() for m in args.only.split(",") if m.strip()] if args.only else None
    start = time.perf_counter()
    records = sweep(only, jobs=args.jobs, timeout=args.timeout, log=None if args.quiet else lambda s: print(s, flush=True))
    seconds = time.perf_counter() - start
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    print(f"{len(records)} architectures in {seconds:.1f} s: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
