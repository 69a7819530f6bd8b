"""What a submitit job runs on each node: the node launcher of the sbatch path, with submitit's own
checkpoint-and-requeue in place of the batch script's `scontrol requeue`.

Near the time limit Slurm sends submitit's signal (USR2, `#SBATCH --signal=USR2@<signal_lead_s>`)
to every process of the step. The launcher and the ranks' wrappers ignore it; the ranks stop after
the same optimizer step, checkpoint, and rank 0 writes the requeue marker, as on the sbatch path. On
procid 0 submitit's handler calls NodeTask.checkpoint, which waits for this node's launcher to exit
and hands submitit the task to run again; submitit pickles it, runs `scontrol requeue` and exits.
The other nodes' handlers do nothing: their launchers exit 0 after the checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hpcft.distenv import RDZV_PORT_VAR, RUN_DIR_VAR, STOP_SIGNAL_VAR, collect_slurm_env
from hpcft.paths import RunPaths


@dataclass
class NodeTask:
    command: list[str]  # what each rank runs, as python arguments (render.entry_command)
    job_dir: str  # <output_dir>/<name>; the run directory is <job_dir>/<job-id>
    env: dict[str, str] = field(default_factory=dict)  # the spec's env
    rdzv_port: int | None = None  # launch.rdzv_port
    requeue: bool = True  # launch.requeue: after a checkpointed stop, submitit requeues the job
    _launcher: subprocess.Popen | None = field(default=None, init=False, repr=False, compare=False)

    def __call__(self) -> int:
        from submitit import JobEnvironment

        job_id = collect_slurm_env().job_id or "0"
        env = dict(os.environ, **self.env)
        env[RUN_DIR_VAR] = str(self._paths().run_dir)
        env[STOP_SIGNAL_VAR] = JobEnvironment.USR_SIG  # the signal submitit's handler waits for
        if self.rdzv_port is not None:
            env[RDZV_PORT_VAR] = str(self.rdzv_port)
        os.makedirs(env[RUN_DIR_VAR], exist_ok=True)
        self._launcher = subprocess.Popen([sys.executable, "-m", "hpcft.launch", "--node", "--", *self.command],
                                          env=env)
        rc = self._wait_then_ignore_warnings()
        if rc != 0:
            raise RuntimeError(f"node launcher exited with status {rc}; see hpcft logs {job_id}")
        return rc

    def _wait_then_ignore_warnings(self) -> int:
        """The launcher's exit status; from then on this process ignores submitit's warning signal.
        Once the launcher is gone a warning has nothing to stop or checkpoint, and one that lands while
        Python exits (its handlers are reset to the default then, which kills) ends this task by a
        signal: Slurm then fails the whole job after a run that finished (seen when the last step ended
        at the warning: the job FAILED with its model exported)."""
        from submitit import JobEnvironment
        from submitit.core.utils import UncompletedJobError

        while True:
            try:
                rc = self._launcher.wait()
                signal.signal(JobEnvironment._usr_sig(), signal.SIG_IGN)
                return rc
            except UncompletedJobError:
                # submitit's handler raises this (procid 0) when checkpoint() declined the requeue. The
                # launcher has exited by then; its status decides, as on the sbatch path.
                continue

    def checkpoint(self):
        """Called by submitit's signal handler on procid 0. Returns the task to run again after the
        requeue, or None (no requeue) when the ranks did not stop at a checkpoint or launch.requeue
        is off."""
        from submitit.helpers import DelayedSubmission

        if self._launcher is None:  # signalled before the launcher started: nothing to lose
            return DelayedSubmission(dataclasses.replace(self)) if self.requeue else None
        self._wait_for_launcher()
        marker = self._paths().requeue_marker
        if not (self.requeue and marker.exists()):
            return None
        marker.unlink()
        return DelayedSubmission(dataclasses.replace(self))  # a fresh task: no Popen in the pickle

    def _wait_for_launcher(self) -> None:
        """Block until this node's launcher has exited (torchrun leaves only once every node's ranks
        are done), without reaping it. This runs inside a signal handler while the main thread may
        be inside Popen.wait(), holding a lock that a second wait() would deadlock on."""
        proc = self._launcher
        if proc is None or proc.returncode is not None:
            return
        try:
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:  # that wait() reaped it a moment ago
            pass

    def _paths(self) -> RunPaths:
        return RunPaths(Path(self.job_dir) / (collect_slurm_env().job_id or "0"))
