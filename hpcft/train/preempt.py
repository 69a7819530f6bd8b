"""Stop cleanly before the time limit: Slurm sends USR1 (launch.signal_lead_s; submitit's own signal
under that backend, see hpcft.stopsignal), any rank that got it makes all ranks stop after the same
optimizer step, checkpoint, and ask for a requeue."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from hpcft.stopsignal import stop_signals
from hpcft.train.dist import Runtime


class StopRequest:
    """Set from a signal handler; read by the loop once per optimizer step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None

    def install(self, signals=None) -> "StopRequest":
        for sig in stop_signals() if signals is None else signals:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name

    def agreed(self, rt: Runtime) -> bool:
        """True on every rank as soon as any rank was signalled (one tiny all-reduce)."""
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=rt.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
