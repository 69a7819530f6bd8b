"""The rendezvous store of a multi-node launch, hosted by the head node's launcher so that it leaves last.

torchrun's c10d rendezvous puts its TCP store inside the agent whose hostname matches the endpoint. That
agent exits as soon as its own ranks and the exit barrier are done, while the other nodes' agents still
close the rendezvous through the store; they then fail ("The connection to the C10d store has failed",
"failed to shutdown the rendezvous") after a run that succeeded. Here every agent is a client
(`--rdzv-conf is_host=false`). The head node's launcher (hpcft.launch) opens the store beside its torchrun
and keeps it open until every other node's launcher has said, by a file in the run directory, that its
torchrun exited, or until LEAVE_WAIT_S passed.

    argv += AGENT_CONF                    # every node, when hosted(...)
    store = open_store(port)              # head node, right after starting torchrun (agents retry until it is up)
    mark_left(paths.launcher_left(key, node_rank))            # other nodes, after torchrun exits
    missing = await_left([paths.launcher_left(key, r) for r in range(1, nnodes)])   # head node
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

AGENT_CONF = ("--rdzv-conf", "is_host=false")
LEAVE_WAIT_S = 60.0  # how long the head node keeps the store for nodes that have not said they left
STORE_TIMEOUT_S = 900  # the store's own operation timeout (the agents set theirs)


def hosted(nnodes: int, run_dir: str | None) -> bool:
    """The launcher hosts the store when there are other nodes to outlive and a shared run directory
    to hear from them in; every node decides the same way from the same environment."""
    return nnodes > 1 and bool(run_dir)


def open_store(port: int, timeout_s: float = STORE_TIMEOUT_S):
    """A TCP store server on `port` (every interface), for torchrun's agents to rendezvous through.
    Raises RuntimeError (torch's DistNetworkError) when the port cannot be bound."""
    import datetime

    from torch.distributed import TCPStore

    return TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=timeout_s))


def mark_left(path: Path) -> None:
    """This node's torchrun exited: it needs the store no more."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(socket.gethostname() + "\n")


def await_left(paths: list[Path], timeout_s: float = LEAVE_WAIT_S, *, poll_s: float = 0.2) -> list[Path]:
    """Wait until every path exists or timeout_s passed; the ones still missing."""
    deadline = time.monotonic() + timeout_s
    missing = [p for p in paths if not p.exists()]
    while missing and time.monotonic() < deadline:
        time.sleep(poll_s)
        missing = [p for p in missing if not p.exists()]
    return missing
