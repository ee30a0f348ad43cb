"""``hf-cb serve``: the OpenAI-compatible API over the model's engine, until SIGTERM or Ctrl-C.

What can be checked without the model is checked before it loads (a minute for a large one):
the server's options (an empty API key is refused) and whether the port is free.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from hf_cb.cli import launcher
from hf_cb.cli.startup import check_serve_extra, dp_size, start, stop

logger = logging.getLogger("hf_cb")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    from hf_cb.server.options import MAX_REQUEST_BYTES

    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000; 0: any free port)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients use (default: MODEL as given)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set HF_CB_API_KEY)")
    parser.add_argument("--data-parallel-size", type=int, default=1,
                        help="engine replicas behind the one endpoint (each of --tensor-parallel-size GPUs); a "
                             "request goes to the one with the fewest outstanding tokens")
    parser.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                        help=f"largest request body; a larger one gets a 413 (default {MAX_REQUEST_BYTES})")
    parser.add_argument("--max-prompts-per-request", type=int, default=1024,
                        help="most prompts in one /v1/completions request (default 1024)")
    parser.add_argument("--enable-docs", action="store_true", help="serve /docs, /redoc and /openapi.json")
    parser.add_argument("--disable-log-requests", action="store_true", help="no access-log line per request")
    parser.add_argument("--protect-metrics", action="store_true", help="/metrics needs the API key too")


def server_options(args: argparse.Namespace):
    """The server's `ServerOptions`; exits naming the problem (an empty key, a bad limit)."""
    check_serve_extra()
    from hf_cb.server.options import ServerOptions

    api_key = args.api_key if args.api_key is not None else os.environ.get("HF_CB_API_KEY")
    try:
        return ServerOptions(api_key=api_key, max_request_bytes=args.max_request_bytes,
                             max_prompts=args.max_prompts_per_request, enable_docs=args.enable_docs,
                             log_requests=not args.disable_log_requests, protect_metrics=args.protect_metrics)
    except ValueError as error:
        sys.exit(f"hf-cb serve: {error}")


def check_port(host: str, port: int) -> None:
    """Exit unless ``host:port`` can be bound now (as uvicorn binds it, with SO_REUSEADDR)."""
    if port == 0:
        return
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as error:
        sys.exit(f"hf-cb serve: cannot listen on {host}:{port}: {error.strerror or error} (is another server "
                 "there? choose another --port)")


def preflight(args: argparse.Namespace) -> None:
    """Before any rank loads the model: the options, and the port (rank 0's)."""
    server_options(args)
    if not launcher.under_torchrun() or os.environ.get("RANK") == "0":
        check_port(args.host, args.port)


def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or Ctrl-C (exit status 0), or until the HTTP front end's process
    ends on its own (logged; exit status 1, so that a supervisor restarts the server)."""
    from hf_cb.server import HTTPServer

    options = server_options(args)
    loaded, online = start(args)
    replicas = launcher.Replicas(args.tensor_parallel_size) if dp_size(args) > 1 else None
    if replicas is not None and not replicas.is_first:
        _serve_replica(online, replicas)
        return
    name = args.served_model_name or loaded.name
    server = HTTPServer(online, loaded.tokenizer, model_name=name, host=args.host, port=args.port, options=options)
    if args.host not in ("127.0.0.1", "localhost", "::1") and options.api_key is None:
        logger.warning("hf_cb: listening on %s without --api-key: anyone who can reach it can use it", args.host)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server as Ctrl-C does
    front_end_died = False
    try:
        server.start()
        if replicas is not None:  # the other replicas' engines join its front end
            replicas.broadcast(server.engine_address)
        engine = online.engine
        logger.info("hf_cb: serving %s as %r at %s/v1 (%s, %s); KV cache: %d tokens in %d pages; %s",
                    loaded.name, name, server.url, engine.device, str(engine.dtype).removeprefix("torch."),
                    engine.manager.num_pages * engine.config.page_size, engine.manager.num_pages,
                    type(engine.backend).__name__)
        status = server.wait()
        logger.error("hf_cb: the HTTP front end (pid %d) ended with %s; stopping the engine",
                     server.process.pid, launcher.exit_status(status))
        front_end_died = True
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if replicas is not None:
            replicas.broadcast("stop")
        stop(online)
    if front_end_died:
        sys.exit(1)


def _serve_replica(online, replicas: launcher.Replicas) -> None:
    """Another data-parallel replica: its engine joins rank 0's front end until rank 0 stops."""
    from hf_cb.server.http_server import join

    for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 ends it, once its server has stopped
        signal.signal(sig, signal.SIG_IGN)
    address = replicas.broadcast()
    if address == "stop":  # rank 0 could not serve
        stop(online)
        return
    bridge = join(online, *address)
    try:
        replicas.broadcast()  # "stop"
    finally:
        bridge.close()
        stop(online)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
