"""Which signals mean "checkpoint and stop, the time limit is near".

The sbatch path asks Slurm for USR1 (`#SBATCH --signal=USR1@<launch.signal_lead_s>`). The submitit
path gets submitit's own signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL names another); its NodeTask
names that one in STOP_SIGNAL_VAR for the processes it starts. Slurm signals every process of the
step, so the launcher and the ranks' wrappers ignore these signals and only the ranks act on them.
"""
from __future__ import annotations

import os
import signal
from typing import Mapping

from hpcft.distenv import STOP_SIGNAL_VAR
from hpcft.errors import SpecError


def stop_signals(env: Mapping[str, str] | None = None) -> tuple[signal.Signals, ...]:
    name = (os.environ if env is None else env).get(STOP_SIGNAL_VAR, "")
    if not name:
        return (signal.SIGUSR1,)
    try:
        extra = signal.Signals["SIG" + name.removeprefix("SIG")]
    except KeyError:
        raise SpecError(STOP_SIGNAL_VAR, f"no signal named {name!r}; use a name such as USR2") from None
    return tuple(dict.fromkeys((signal.SIGUSR1, extra)))


def ignore_stop_signals(env: Mapping[str, str] | None = None) -> None:
    """Until a process installs its own handler, a stop signal must not kill it (default action).
    Ignored dispositions survive exec."""
    for sig in stop_signals(env):
        signal.signal(sig, signal.SIG_IGN)
