"""``hf-cb`` (and ``python -m hf_cb``): ``serve`` the OpenAI-compatible API, or ``generate``
answers for a JSONL file. With no MODEL, both use the embedded default model."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import typing
from pathlib import Path

from hf_cb.cli import launcher
from hf_cb.core.config import EngineConfig

logger = logging.getLogger("hf_cb")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One option per `EngineConfig` field (``--max-num-seqs``, ``--compile/--no-compile``, ...)."""
    group = parser.add_argument_group("engine (hf_cb.EngineConfig)")
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        shown = "decided by the engine (see hf_cb.EngineConfig)" if f.default is None else f.default
        kwargs: dict = {"default": f.default, "help": f"default: {shown}"}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        else:  # int, float, or X | None
            kind = ([t for t in typing.get_args(hint) if t is not type(None)] or [hint])[0]
            kwargs["type"] = _boolean if kind is bool else kind
            kwargs["metavar"] = "BOOL" if kind is bool else f.name.upper()
            if kind is bool:  # a bare --compile means true
                kwargs["nargs"], kwargs["const"] = "?", True
        group.add_argument(flag, dest=f"engine_{f.name}", **kwargs)


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def engine_config_from(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f"engine_{f.name}") for f in dataclasses.fields(EngineConfig)})


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="a hub id, a local folder or a .gguf file (default: SmolLM2-135M-Instruct, embedded)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU), bfloat16, float16, float32")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--trust-remote-code", action="store_true", help="run code from the model's repository")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks that each hold a shard of the weights, one GPU each (hf-cb starts them)")
    add_engine_args(parser)


def _start(args: argparse.Namespace):
    """Load the model and start its online engine."""
    try:
        from hf_cb import server  # noqa: F401 - fails early without the serve extra
    except ImportError as error:
        sys.exit(f"hf-cb: {error.name} is missing: pip install 'hf_cb[serve]'")
    from hf_cb.distributed.tensor_parallel import follows
    from hf_cb.engine.on_model import get_engine
    from hf_cb.entrypoints.model_loader import load_model
    from hf_cb.entrypoints.online import OnlineEngine

    loaded = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                        tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=_dp_size(args))
    config = engine_config_from(args)
    if follows(loaded.model):  # a tensor-parallel rank other than the first: it steps as that one does
        for sig in (signal.SIGTERM, signal.SIGINT):  # the first rank ends it, once its server has stopped
            signal.signal(sig, signal.SIG_IGN)
        get_engine(loaded.model, config).follow()
        sys.exit(0)
    online = OnlineEngine(loaded.model, config, tokenizer=loaded.tokenizer)
    return loaded, online


def _stop(online) -> None:
    """Stop the engine loop, and the tensor-parallel ranks that follow it."""
    online.shutdown()
    if online.engine.tp is not None:
        online.engine.tp.stop()


def _dp_size(args: argparse.Namespace) -> int:
    return getattr(args, "data_parallel_size", 1)


def serve(args: argparse.Namespace) -> None:
    from hf_cb.server import HTTPServer

    loaded, online = _start(args)
    replicas = launcher.Replicas(args.tensor_parallel_size) if _dp_size(args) > 1 else None
    if replicas is not None and not replicas.is_first:
        _serve_replica(online, replicas)
        return
    api_key = args.api_key or os.environ.get("HF_CB_API_KEY")
    name = args.served_model_name or loaded.name
    server = HTTPServer(online, loaded.tokenizer, model_name=name, host=args.host, port=args.port, api_key=api_key)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logger.warning("hf_cb: listening on %s without --api-key: anyone who can reach it can use it", args.host)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server as Ctrl-C does
    try:
        server.start()
        if replicas is not None:  # the other replicas' engines join its front end
            replicas.broadcast(server.engine_address)
        engine = online.engine
        logger.info("hf_cb: serving %s as %r at %s/v1 (%s, %s); KV cache: %d tokens in %d pages; %s",
                    loaded.name, name, server.url, engine.device, str(engine.dtype).removeprefix("torch."),
                    engine.manager.num_pages * engine.config.page_size, engine.manager.num_pages,
                    type(engine.backend).__name__)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if replicas is not None:
            replicas.broadcast("stop")
        _stop(online)


def _serve_replica(online, replicas: launcher.Replicas) -> None:
    """Another data-parallel replica: its engine joins rank 0's front end until rank 0 stops."""
    from hf_cb.server.http_server import join

    for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 ends it, once its server has stopped
        signal.signal(sig, signal.SIG_IGN)
    address = replicas.broadcast()
    if address == "stop":  # rank 0 could not serve
        _stop(online)
        return
    bridge = join(online, *address)
    try:
        replicas.broadcast()  # "stop"
    finally:
        bridge.close()
        _stop(online)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def generate(args: argparse.Namespace) -> None:
    lines = Path(args.input).read_text().splitlines()
    loaded, online = _start(args)
    from hf_cb.cli.generate_file import BadLine, generate_file

    try:
        results = asyncio.run(generate_file(online, loaded, lines, args))
    except BadLine as error:
        sys.exit(f"hf-cb generate: {error}")
    finally:
        _stop(online)
    with open(args.output, "w") if args.output != "-" else sys.stdout as out:
        for result in results:
            out.write(json.dumps(result, ensure_ascii=False) + "\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-cb", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL as given)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set HF_CB_API_KEY)")
    s.add_argument("--data-parallel-size", type=int, default=1,
                   help="engine replicas behind the one endpoint (each of --tensor-parallel-size GPUs); a request "
                        "goes to the one with the fewest outstanding tokens")
    s.set_defaults(func=serve)
    g = sub.add_parser("generate", help="answer every line of a JSONL file, in order")
    _add_model_args(g)
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
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    nproc = args.tensor_parallel_size * _dp_size(args)
    if nproc > 1 and not launcher.under_torchrun():
        sys.exit(launcher.launch(nproc, argv))
    if launcher.under_torchrun():
        launcher.check_world(nproc)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        args.func(args)
    except SystemExit as stop:  # a tensor-parallel follower's end (`_start`) is a success
        if stop.code not in (None, 0):
            raise
    finally:
        launcher.leave()
    if launcher.under_torchrun():
        launcher.exit_rank()


if __name__ == "__main__":
    main()
