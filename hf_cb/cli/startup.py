"""What every ``hf-cb`` command shares: the model and engine options, and starting the engine."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import typing

from hf_cb.core.config import EngineConfig

SERVE_EXTRA = ("fastapi", "uvicorn", "starlette", "prometheus_client", "pydantic")


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


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="a hub id, a local folder or a .gguf file (default: SmolLM2-135M-Instruct, embedded)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (float32 on CPU; on CUDA bf16, or fp16 for an fp16 checkpoint), bfloat16, float16, "
                             "float32")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--trust-remote-code", action="store_true", help="run code from the model's repository")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks that each hold a shard of the weights, one GPU each (hf-cb starts them)")
    add_engine_args(parser)


def check_serve_extra() -> None:
    """Exit with the install line if the ``serve`` extra is missing (not on any other import error)."""
    try:
        from hf_cb import server  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name not in SERVE_EXTRA:
            raise
        sys.exit(f"hf-cb: {error.name} is missing: pip install 'hf_cb[serve]'")


def start(args: argparse.Namespace):
    """Load the model and start its online engine."""
    check_serve_extra()
    from hf_cb.distributed.tensor_parallel import follows
    from hf_cb.engine.on_model import get_engine
    from hf_cb.entrypoints.model_loader import load_model
    from hf_cb.entrypoints.online import OnlineEngine

    loaded = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                        tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=dp_size(args))
    config = engine_config_from(args)
    if follows(loaded.model):  # a tensor-parallel rank other than the first: it steps as that one does
        for sig in (signal.SIGTERM, signal.SIGINT):  # the first rank ends it, once its server has stopped
            signal.signal(sig, signal.SIG_IGN)
        get_engine(loaded.model, config).follow()
        sys.exit(0)
    online = OnlineEngine(loaded.model, config, tokenizer=loaded.tokenizer)
    return loaded, online


def stop(online) -> None:
    """Stop the engine loop, and the tensor-parallel ranks that follow it."""
    online.shutdown()
    if online.engine.tp is not None:
        online.engine.tp.stop()


def dp_size(args: argparse.Namespace) -> int:
    return getattr(args, "data_parallel_size", 1)
