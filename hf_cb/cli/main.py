"""``hf-cb`` (and ``python -m hf_cb``): ``serve`` the OpenAI-compatible API, ``generate``
answers for a JSONL file (with no MODEL, both use the embedded default model), or ``eval``
with lm-evaluation-harness on the engine."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from hf_cb.cli import launcher
from hf_cb.cli.serve import add_serve_args, preflight, serve
from hf_cb.cli.startup import add_model_args, dp_size, start, stop


def generate(args: argparse.Namespace) -> None:
    """Answer every line of ``--input`` into ``--output``. The files and every line's request
    are checked before the model loads (~20 s), and what needs the model (prompt lengths, the
    chat template) right after it; any bad line stops the command before anything is generated,
    with every bad line named."""
    try:
        from hf_cb.cli import generate_file as gf
    except ModuleNotFoundError as error:  # a line is a server request: the serve extra reads it
        sys.exit(f"hf-cb: {error.name} is missing: pip install 'hf_cb[serve]'")
    from hf_cb.entrypoints.model_loader import DEFAULT_MODEL_NAME

    served = DEFAULT_MODEL_NAME if args.model is None else args.model  # the name load_model gives it
    try:
        gf.check_output(args.output)
        lines = gf.read_requests(args.input, gf.line_defaults(args), served)
        loaded, online = start(args)
        try:
            results = asyncio.run(gf.generate_file(online, loaded, lines, progress=not args.no_progress))
        finally:
            stop(online)
    except gf.BadInput as error:
        print("\n".join(f"hf-cb generate: {problem}" for problem in error.problems), file=sys.stderr)
        sys.exit(error.status)
    gf.write_results(results, args.output)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-cb", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    add_model_args(s)
    add_serve_args(s)
    s.set_defaults(func=serve)
    g = sub.add_parser("generate", help="answer every line of a JSONL file, in order")
    add_model_args(g)
    g.add_argument("--input", required=True, help='JSONL: {"prompt": ...} or {"messages": [...]} per line')
    g.add_argument("--output", required=True, help="JSONL answers, one per input line ('-': stdout)")
    g.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a line (256)")
    g.add_argument("--temperature", type=float, default=None, help="default temperature (0: greedy)")
    g.add_argument("--top-p", type=float, default=None, help="default top_p")
    g.add_argument("--seed", type=int, default=None, help="default seed")
    g.add_argument("--n", type=int, default=1, help="default n (samples per line)")
    g.add_argument("--stop", action="append", default=None, help="default stop string (repeatable)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g.set_defaults(func=generate)
    sub.add_parser("eval", help="lm-evaluation-harness on hf_cb: `hf-cb eval LM_EVAL_ARGS` (--model hf_cb by default)",
                   add_help=False)  # its arguments are lm-eval's (`main` passes them through)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # lm-eval's own command line, passed through whole
        from hf_cb.cli.evaluate import run_lm_eval

        return run_lm_eval(argv[1:])
    args = parser().parse_args(argv)
    nproc = args.tensor_parallel_size * dp_size(args)
    if args.func is serve:  # what needs no model, before any rank loads it
        preflight(args)
    if nproc > 1 and not launcher.under_torchrun():
        sys.exit(launcher.launch(nproc, argv))
    if launcher.under_torchrun():
        launcher.check_world(nproc)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        args.func(args)
    except SystemExit as end:  # a tensor-parallel follower's end (`start`) is a success
        if end.code not in (None, 0):
            raise
    finally:
        launcher.leave()
    if launcher.under_torchrun():
        launcher.exit_rank()


if __name__ == "__main__":
    main()
