"""``hf-cb generate``: every line of a JSONL file answered, in input order.

A line is the body of an OpenAI request (``{"prompt": ...}`` or ``{"messages": [...]}`` with
any request field: ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``n``, ``stop``, ...) and
means what it means to the server. Every line is checked before anything is generated: what the
server checks of a body alone (`read_requests`) before the model is loaded, what needs its
tokenizer and engine (`check_requests`) after. Either names every bad line, not only the first.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
from argparse import Namespace
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from hf_cb.entrypoints.online import OnlineEngine
from hf_cb.sampling.params import SamplingParams
from hf_cb.server.errors import APIError
from hf_cb.server.protocol import ChatCompletionRequest, CompletionRequest, parse_json, validate
from hf_cb.server.responses import ResponseShape, collect, response_body
from hf_cb.server.serving import Serving, check_model

Request = CompletionRequest | ChatCompletionRequest
T = TypeVar("T")
R = TypeVar("R")


class BadInput(ValueError):
    """Input that cannot run. ``problems``: each one named (a bad line by its number);
    ``status``: the command's exit status (1: bad lines; 2: a file it cannot use, as argparse's)."""

    def __init__(self, problems: list[str], status: int = 1):
        super().__init__("\n".join(problems))
        self.problems, self.status = problems, status


class BadLine(ValueError):
    """One line of the input that cannot run; the message says why, without its number."""


@dataclass
class Line:
    """A line that passed the checks the server makes of a body alone."""

    number: int
    request: Request


@dataclass
class Job:
    """A line that can run: its prompts and each prompt's sampling parameters."""

    request: Request
    prompts: list[list[int]]
    params: list[SamplingParams]
    logprobs: int | None  # the alternatives asked for (None: no log-probabilities)


def line_defaults(args: Namespace) -> dict[str, Any]:
    """The request fields the command's flags give a line that leaves them out."""
    flags = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "seed": args.seed, "n": args.n, "stop": args.stop}
    return {k: v for k, v in flags.items() if v is not None}


def check_output(path: str) -> None:
    """`BadInput` (status 2) if ``path`` ('-': stdout) cannot be the output file: checked before
    the model loads, so that a mistyped folder does not cost the whole run."""
    if path == "-":
        return
    target = Path(path)
    if not target.parent.is_dir():
        raise BadInput([f"cannot write the output file {path}: no folder {target.parent}"], status=2)
    if target.is_dir():
        raise BadInput([f"cannot write the output file {path}: it is a folder"], status=2)


def read_requests(path: str, defaults: dict[str, Any], model_name: str) -> list[Line]:
    """Each non-blank line of the file at ``path`` as a request, checked as the server checks a
    body before it runs anything: a JSON object, valid for the schema (with ``defaults`` for the
    fields it leaves out), naming ``model_name`` if it names a model. `BadInput` names the file
    if it cannot be read, else every bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise BadInput([f"cannot read the input file {path}: {error.strerror or error}"], status=2) from error
    except UnicodeDecodeError as error:
        raise BadInput([f"the input file {path} is not UTF-8 text: {error}"], status=2) from error
    numbered = ((number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip())
    return [Line(number, req) for number, req in
            _every_line(numbered, functools.partial(_request, defaults=defaults, model_name=model_name))]


def check_requests(serving: Serving, lines: list[Line]) -> list[Job]:
    """Each line's prompts and sampling parameters, checked against the tokenizer (the chat
    template) and the engine (the context, the page pool) as the server checks them; `BadInput`
    names every line that can never run."""
    return [job for _, job in _every_line(((line.number, line.request) for line in lines),
                                          functools.partial(_job, serving))]


def _every_line(numbered: Iterable[tuple[int, T]], check: Callable[[T], R]) -> list[tuple[int, R]]:
    """``(number, check(item))`` for each numbered item; `BadInput` naming every line whose
    check raised `BadLine`, if any did."""
    results, problems = [], []
    for number, item in numbered:
        try:
            results.append((number, check(item)))
        except BadLine as error:
            problems.append(f"line {number}: {error}")
    if problems:
        raise BadInput(problems)
    return results


def _request(line: str, defaults: dict[str, Any], model_name: str) -> Request:
    """One line's request; `BadLine` with the server's wording of its problem."""
    try:
        body = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadLine(f"not JSON ({error.msg} at column {error.colno})") from error
    if not isinstance(body, dict):
        raise BadLine(f"expected a JSON object, got {type(body).__name__}")
    try:
        body = parse_json(json.dumps({**defaults, **body}).encode())  # the server's checks of a body
        req = validate(body, ChatCompletionRequest if "messages" in body else CompletionRequest)
        check_model(req.model, model_name)  # the served name is known before the model loads
    except APIError as error:
        raise BadLine(error.message) from error
    return req


def _job(serving: Serving, req: Request) -> Job:
    """One request's prompts and parameters; `BadLine` with the server's wording of its problem."""
    chat = isinstance(req, ChatCompletionRequest)
    try:
        prompts = [serving.chat_prompt(req)] if chat else serving.completion_prompts(req)
        logprobs = ((req.top_logprobs or 0) if req.logprobs else None) if chat else req.logprobs
        return Job(req, prompts, serving.check(req, prompts, logprobs, "messages" if chat else "prompt"), logprobs)
    except APIError as error:
        raise BadLine(error.message) from error


def _result(serving: Serving, req: Request, shape: ResponseShape, choices) -> dict:
    """One output line (docs/serving.md): the first choice's fields, and every choice when ``n`` > 1."""
    body = response_body(serving, choices, shape)

    def one(i: int) -> dict:
        choice = body["choices"][i]
        text = choice["message"]["content"] if shape.chat else choice["text"]
        out = {"text": text, "finish_reason": choice["finish_reason"], "completion_tokens": len(choices[i].token_ids)}
        if shape.want_logprobs:
            out["logprobs"] = choice["logprobs"]
        out.update({k: choice[k] for k in ("prompt_logprobs", "prompt_token_ids", "token_ids") if k in choice})
        return out

    result = {**one(0), "prompt_tokens": shape.num_prompt_tokens,
              "completion_tokens": sum(len(c.token_ids) for c in choices)}
    if len(choices) > 1:
        result["choices"] = [one(i) for i in range(len(choices))]
    return result


async def generate_file(online: OnlineEngine, loaded: Any, lines: list[Line], progress: bool = True) -> list[dict]:
    """One result per line (from `read_requests`): ``text``, ``finish_reason``,
    ``prompt_tokens``, ``completion_tokens`` (all choices), and ``choices`` when ``n`` > 1.
    `BadInput` names every line that cannot run on this model, before any is generated."""
    serving = Serving.create(online, loaded.tokenizer, loaded.name)
    jobs = check_requests(serving, lines)
    bar = tqdm(total=len(jobs), disable=not progress, unit="line", desc="hf-cb generate")
    start, generated = time.perf_counter(), 0

    async def run(job: Job) -> dict:
        nonlocal generated
        req = job.request
        echo = serving.echo_texts(req, job.prompts) if getattr(req, "echo", False) else None
        shape = ResponseShape.of(req, job.prompts, job.logprobs, echo)
        choices = await collect(serving, serving.submit(req, job.prompts, job.params), shape)
        generated += sum(len(c.token_ids) for c in choices)
        bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.0f}", refresh=False)
        bar.update(1)
        return _result(serving, req, shape, choices)

    try:
        return await asyncio.gather(*(run(job) for job in jobs))
    finally:
        bar.close()


def write_results(results: list[dict], path: str) -> None:
    """One JSON line per result into the file at ``path``, or onto stdout for '-', which stays
    open: a tensor-parallel rank's exit flushes it afterwards."""
    text = "".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results)
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(path).write_text(text, encoding="utf-8")
