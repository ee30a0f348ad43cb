"""The processes of a parallel ``hf-cb`` command: ``--tensor-parallel-size T`` and
``--data-parallel-size D`` need T x D ranks, one per GPU.

``hf-cb`` started by hand starts the ranks itself (`launch`: ``python -m hf_cb ARGS`` again with
the environment torchrun would give, rendezvous on loopback); started by torchrun
(``torchrun --nproc-per-node N -m hf_cb serve ...``), it runs as one of them. Transformers' mesh
puts the tensor-parallel dimension last, so replica ``r`` is ranks ``r*T .. r*T + T-1``; its first
rank runs the replica's engine loop and the others follow it (`LLMEngine.follow`).
Rank 0 serves HTTP.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any, NoReturn

_GRACE_S = 30  # after rank 0 ends: for the others to end too, before they are killed
_IDLE_TIMEOUT = timedelta(days=24)  # the replicas wait this long for rank 0's next word (gloo's max)


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def check_world(nproc: int) -> None:
    """Exit unless exactly ``nproc`` ranks were started."""
    world = int(os.environ["WORLD_SIZE"])
    if world != nproc:
        raise SystemExit(f"hf-cb: --tensor-parallel-size x --data-parallel-size is {nproc}, but {world} ranks "
                         "were started")


def leave() -> None:
    """Destroy this rank's process group, if it has one, before the interpreter exits: a gloo
    group's threads still running at exit can abort the process ("terminate called without an
    active exception", seen once in CI at the end of a data-parallel server)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_rank() -> NoReturn:
    """End a rank that finished its work: Python's exit handlers, then ``os._exit(0)``, which
    skips C++'s static destructors. Even after `leave`, a tensor-parallel follower aborted in
    them now and then ("terminate called without an active exception", with no Python frame left:
    2 of 24 runs of ``hf-cb serve --tensor-parallel-size 2`` on CPU), and the server's SIGTERM
    then ended with a failed status."""
    atexit._run_exitfuncs()  # logging's flush, Inductor's compile workers, ...
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``hf-cb ARGV`` as ``nproc`` ranks on this machine until they end; return the worst
    exit status. SIGTERM and SIGINT go to rank 0, which stops the others; if a rank fails, the
    rest are terminated."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-m", "hf_cb", *argv],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: procs[0].send_signal(signal.SIGTERM))
    while all(p.poll() is None for p in procs):
        time.sleep(0.2)
    failed = any(p.returncode not in (None, 0) for p in procs)
    deadline = time.monotonic() + (0 if failed else _GRACE_S)
    for p in procs:
        if p.poll() is None:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                _end(p)
    for rank, p in enumerate(procs):
        if p.returncode != 0:
            print(f"hf-cb: rank {rank} of {nproc} ended with {exit_status(p.returncode)}", file=sys.stderr)
    return max((abs(p.returncode) for p in procs), default=0)


def exit_status(code: int) -> str:
    """``Popen.returncode`` in words: ``status 1``, ``signal SIGABRT``."""
    if code >= 0:
        return f"status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def _end(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # a follower ignores SIGTERM (its first rank ends it)
        proc.kill()
        proc.wait()


class Replicas:
    """The first ranks of the engine replicas (``--data-parallel-size``): rank 0 tells the others
    where its HTTP front end takes engines (`broadcast` of its address), and later to stop."""

    def __init__(self, tp_size: int):
        import torch.distributed as dist

        firsts = list(range(0, dist.get_world_size(), tp_size))
        self.group = dist.new_group(firsts, backend="gloo", timeout=_IDLE_TIMEOUT, use_local_synchronization=True)
        self.is_first = dist.get_rank() == 0

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj``, on every replica's first rank (they wait here until rank 0 sends)."""
        from hf_cb.distributed.tensor_parallel import broadcast_object

        return broadcast_object(obj, self.group)
