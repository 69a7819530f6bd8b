"""Per-rank wrapper that torchrun starts: runs the rank's command with its output in its own log
file and records how it ended (exit code or signal, host, time) next to it.

    torchrun ... -m hpcft.rankrun -m hpcft.train --lr=3e-4     # what the node launcher runs

Rank 0's output also goes to the launcher's stdout (the job's slurm-<id>.out). Signals that Slurm
or torchrun send to the wrapper are passed on to the rank; a rank that is stopped (SIGSTOP, state T)
would keep a pending SIGTERM and the job alive forever, so it gets SIGKILL instead. Its exit record
says it was stopped when the wrapper saw it in state T for two samples in a row (sampled every
STOP_SAMPLE_S): Slurm's own step teardown sends SIGCONT before SIGTERM, so by the time the job ends
the rank may be running again and die of the SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from hpcft.cpuworld import on_cpu
from hpcft.distenv import RUN_DIR_VAR, collect_dist_env
from hpcft.paths import RunPaths
from hpcft.stopsignal import ignore_stop_signals

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
STOP_SAMPLE_S = 1.0  # how often the wrapper looks whether its rank is stopped (one /proc read)


def child_argv(command: list[str]) -> list[str]:
    """`-m mod args` and `script.py args` run under this Python; anything else runs as a program. A
    user's script on a node without CUDA runs through hpcft.cpuworld, so that Accelerate forms one
    CPU world there (hpcft's own modules need nothing of it)."""
    if command[0] in ("-m", "-c") or command[0].endswith(".py"):
        own = command[0] == "-c" or (command[0] == "-m" and command[1:2] and command[1].startswith("hpcft."))
        if on_cpu() and not own:
            return [sys.executable, "-m", "hpcft.cpuworld", *command]
        return [sys.executable, *command]
    return command


def is_stopped(pid: int) -> bool:
    """State T in /proc/PID/stat: stopped by a signal (SIGSTOP, SIGTSTP)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].startswith("T")


def watch_stopped(proc: subprocess.Popen, seen: list, interval: float = STOP_SAMPLE_S) -> threading.Thread:
    """Append True to `seen` once the rank has been in state T for two samples in a row."""
    def run() -> None:
        before = False
        while proc.poll() is None:
            now = is_stopped(proc.pid)
            if now and before:
                seen.append(True)
                return
            before = now
            time.sleep(interval)

    thread = threading.Thread(target=run, name="hpcft-stopped", daemon=True)
    thread.start()
    return thread


def write_exit_record(path: Path, *, rank: int, returncode: int, started: float, stopped: bool = False) -> None:
    sig = -returncode if returncode < 0 else None
    record = {
        "rank": rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "returncode": returncode,
        "signal": signal.Signals(sig).name if sig else None,
        "started": started,
        "ended": time.time(),
        "stopped": stopped,  # the rank was stopped (SIGSTOP) when the job was torn down
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("usage: python -m hpcft.rankrun <-m module | script.py | program> [args...]", file=sys.stderr)
        return 2
    dist = collect_dist_env()
    run_dir = os.environ.get(RUN_DIR_VAR)
    if not run_dir:
        os.execvp(child_argv(command)[0], child_argv(command))
    paths = RunPaths(Path(run_dir))
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(paths.rank_log(dist.rank), "ab", buffering=0) as log:
        tee = dist.rank == 0
        proc = subprocess.Popen(child_argv(command), env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if tee else log, stderr=subprocess.STDOUT,
                                preexec_fn=ignore_stop_signals)
        stopped = []

        def forward(sig: int, _frame) -> None:
            if is_stopped(proc.pid):
                stopped.append(True)
                proc.kill()
            else:
                proc.send_signal(sig)

        for sig in FORWARDED:
            signal.signal(sig, forward)
        watch_stopped(proc, stopped)
        (paths.rank_pid(dist.rank)).write_text(f"{proc.pid}\n")
        if tee:
            assert proc.stdout is not None
            out = sys.stdout.buffer
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                log.write(chunk)
                try:
                    out.write(chunk)
                    out.flush()
                except (BrokenPipeError, OSError):
                    pass
        rc = proc.wait()
    # The rank is gone: a time-limit warning has nothing left to reach. Ignore it from here on, or one that
    # lands while Python exits (handlers are reset to the default then, which kills) fails a finished run.
    ignore_stop_signals()
    write_exit_record(paths.rank_exit(dist.rank), rank=dist.rank, returncode=rc, started=started,
                      stopped=bool(stopped))
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
