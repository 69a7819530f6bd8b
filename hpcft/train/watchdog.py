"""Progress watchdog of every rank: phase marks from the training loop, a heartbeat file, a stack dump
and an exit when the world stops making progress, and per-rank step statistics (stragglers).

The loop marks phases (`beat.phase("forward")`, `beat.data(loader)`, `beat.step_done(step)`): a clock
read and a few attribute writes, well under a microsecond. A daemon thread looks every second: it
writes rank-NNN.heartbeat.json every few seconds (hpcft/heartbeat.py), and when the rank has entered
no new phase for `train.hang_timeout_s` while armed it dumps the stack of every thread into the
rank's log, dumps the NCCL flight recorder (CUDA), and ends the rank with status 124. In a hang every
healthy rank soon waits inside a collective for the stuck one, so every rank fires within about one
hang_timeout_s and the launcher tears the job down; `hpcft logs` then names the rank that stopped
first from the heartbeat files (hpcft/hang.py).

Armed only inside training steps, after the first step of the run: model load, the first step
(compilation, allocator warm-up), eval, checkpoint saves and export are unbounded here (timeout_s
still bounds each of their collectives).

Stacks come from faulthandler, not py-spy: it is in the standard library (py-spy is a separate
native tool, not installed here and often not on compute nodes), it dumps every thread of this
process from inside it, and its C-level timer (`dump_traceback_later`, re-armed every tick as a
backstop) still dumps and exits when a C call holds the GIL so that this thread cannot run. What it
cannot do is read another process: a rank that is stopped (SIGSTOP) writes nothing; its wrapper
notes the stopped state (hpcft/rankrun.py) and its heartbeat file shows where it was. SIGTERM (the
launcher tearing the job down after the first watchdog fired) dumps the stacks too.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Iterator

from hpcft.distenv import FAULT_HANG_VAR, FAULT_SLOW_VAR
from hpcft.heartbeat import HANG_EXIT, Heartbeat, write_heartbeat
from hpcft.paths import RunPaths
from hpcft.rankstats import median, step_stats, straggler_line

BUSY_PHASES = frozenset({"data", "forward"})  # a rank's own work before it can wait for another rank
ARMED_PHASES = frozenset({"data", "forward", "backward", "optimizer", "step_end", "metrics", "stats"})
WINDOW = 4096  # steps kept for the medians and p95s
STATS_EVERY = 10  # optimizer steps between straggler checks (one all-reduce of 2 x world floats)


class Progress:
    """Where this rank is: written by the training loop, read by the watchdog thread."""

    def __init__(self, rt=None, *, stats_every: int = STATS_EVERY):
        self.rt = rt
        self.rank = rt.env.rank if rt is not None else 0
        self.stats_every = stats_every
        self.step = 0
        self.name = "setup"
        self.beats = 0
        self.t = time.perf_counter()  # when the current phase was entered: the last progress
        self.armed = False
        self._ready = False  # a step of this run completed: the watchdog may arm
        self._busy_phase = False
        self._busy = self._data = 0.0  # this step's busy and data-wait seconds so far
        self._step_end = None
        self.busy: deque[float] = deque(maxlen=WINDOW)
        self.wall: deque[float] = deque(maxlen=WINDOW)
        self.data_wait_s = 0.0
        self._window: list[float] = []  # busy times since the last straggler check
        self.faults = Faults.from_env(self.rank)

    def phase(self, name: str) -> None:
        now = time.perf_counter()
        if self._busy_phase:
            self._busy += now - self.t
            if self.name == "data":
                self._data += now - self.t
        self.name, self.t, self.beats = name, now, self.beats + 1
        self._busy_phase = name in BUSY_PHASES
        self.armed = self._ready and name in ARMED_PHASES
        if self.faults is not None and name == "forward":
            self.faults.inject(self.step + 1)

    def data(self, loader):
        """The loader's batches, the wait for each one marked as the data phase."""
        it = iter(loader)
        while True:
            self.phase("data")
            try:
                batch = next(it)
            except StopIteration:
                return
            yield batch

    def step_done(self, step: int) -> None:
        """An optimizer step completed: record its times; every stats_every steps, name stragglers."""
        self.phase("step_end")
        now = self.t
        if self._step_end is not None:
            self.wall.append(now - self._step_end)
            self.busy.append(self._busy)
            self._window.append(self._busy)
            self.data_wait_s += self._data
        self._step_end, self._busy, self._data = now, 0.0, 0.0
        self.step, self._ready = step, True
        if self.faults is not None:
            self.faults.stepped = False
        if self.stats_every and step % self.stats_every == 0:
            self.check_stragglers(step)

    def check_stragglers(self, step: int) -> None:
        """Every rank's median busy time since the last check, in one all-reduce; rank 0 names stragglers."""
        from hpcft.train.dist import all_reduce_sum

        if self.rt is None:
            return
        self.phase("stats")
        world = self.rt.env.world_size
        values = [0.0] * world
        values[self.rank] = median(self._window)
        medians = dict(enumerate(all_reduce_sum(self.rt, values)))
        line = straggler_line(medians, step, len(self._window)) if self.rank == 0 else None
        if line:
            print(line, flush=True)
        self._window = []

    def stats(self) -> dict:
        return step_stats(tuple(self.busy), tuple(self.wall), self.data_wait_s)


class Faults:
    """Test-only fault injection (HPCFT_FAULT_HANG, HPCFT_FAULT_SLOW), in this rank's forward phase."""

    def __init__(self, hang: tuple[int, float] | None, slow: float | None):
        self.hang, self.slow, self.stepped = hang, slow, False

    @classmethod
    def from_env(cls, rank: int) -> "Faults | None":
        hang = slow = None
        if os.environ.get(FAULT_HANG_VAR):
            r, step, seconds = os.environ[FAULT_HANG_VAR].split(":")
            hang = (int(step), float(seconds)) if int(r) == rank else None
        if os.environ.get(FAULT_SLOW_VAR):
            r, seconds = os.environ[FAULT_SLOW_VAR].split(":")
            slow = float(seconds) if int(r) == rank else None
        return cls(hang, slow) if hang or slow else None

    def inject(self, step: int) -> None:
        if self.slow and not self.stepped:
            self.stepped = True
            time.sleep(self.slow)
        if self.hang and step == self.hang[0]:
            print(f"hpcft.train: fault injection ({FAULT_HANG_VAR}): sleeping {self.hang[1]:.0f} s in step {step}",
                  flush=True)
            time.sleep(self.hang[1])


class Watchdog:
    """The thread that writes the heartbeat file and ends the rank when it stopped making progress."""

    def __init__(self, progress: Progress, paths: RunPaths, *, hang_timeout_s: int, cuda: bool = False):
        self.progress = progress
        self.path = paths.rank_heartbeat(progress.rank)
        self.hang_timeout_s = hang_timeout_s
        self.tick = min(1.0, hang_timeout_s / 10)
        self.interval_s = min(5.0, max(1.0, hang_timeout_s / 10))
        self.flight_recorder = f"{paths.nccl_trace_prefix}{progress.rank}" if cuda else None
        if cuda:
            Path(paths.nccl_trace_prefix).parent.mkdir(parents=True, exist_ok=True)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpcft-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        faulthandler.cancel_dump_traceback_later()
        self.write()

    def write(self, hung: float | None = None) -> None:
        p = self.progress
        now, perf = time.time(), time.perf_counter()
        write_heartbeat(self.path, Heartbeat(
            rank=p.rank, host=self.host, pid=self.pid, step=p.step, phase=p.name, beats=p.beats,
            progress=round(now - (perf - p.t), 3), written=round(now, 3), interval_s=self.interval_s,
            hang_timeout_s=self.hang_timeout_s, armed=p.armed, hung=hung, flight_recorder=self.flight_recorder,
            stats=p.stats()))

    def _run(self) -> None:
        last_write = time.perf_counter()
        backstop = False
        while not self._stop.wait(self.tick):
            p = self.progress
            armed = p.armed
            stale = time.perf_counter() - p.t
            if armed and stale > self.hang_timeout_s:
                self._fire(stale)
            if armed:
                # If this thread cannot run (a C call holding the GIL), faulthandler's own C thread
                # still dumps every stack and ends the rank, a few ticks after the deadline.
                faulthandler.dump_traceback_later(self.hang_timeout_s + 3 * self.tick, exit=True, file=sys.stderr)
                backstop = True
            elif backstop:
                faulthandler.cancel_dump_traceback_later()
                backstop = False
            if time.perf_counter() - last_write >= self.interval_s - self.tick / 2:
                try:
                    self.write()
                except OSError as exc:  # a full or lost disk must not stop the hang check
                    print(f"hpcft.watchdog: heartbeat not written: {exc}", file=sys.stderr, flush=True)
                last_write = time.perf_counter()

    def _fire(self, stale: float) -> None:
        faulthandler.cancel_dump_traceback_later()
        p = self.progress
        main = threading.main_thread().ident or 0
        print(f"hpcft.watchdog: rank {p.rank}: no progress for {stale:.0f} s (hang_timeout_s {self.hang_timeout_s}) "
              f"after step {p.step}, in phase {p.name}; the stack of every thread follows "
              f"(main thread 0x{main:016x})", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print("hpcft.watchdog: end of stacks", file=sys.stderr, flush=True)
        if self.flight_recorder:
            dump_flight_recorder(self.flight_recorder)
        self.write(hung=round(time.time(), 3))
        sys.stdout.flush()
        os._exit(HANG_EXIT)


def dump_flight_recorder(path: str) -> None:
    """Write this rank's NCCL flight recorder buffer (what torch dumps on a collective timeout, which a
    watchdog exit comes before). CUDA builds only; best effort: the stacks are already in the log."""
    try:
        from torch._C._distributed_c10d import _dump_nccl_trace

        Path(path).write_bytes(_dump_nccl_trace())
        print(f"hpcft.watchdog: NCCL flight recorder dumped to {path}", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - a missing or failing dump must not keep a hung rank alive
        print(f"hpcft.watchdog: no NCCL flight recorder dump ({exc})", file=sys.stderr, flush=True)


@contextlib.contextmanager
def watch(hang_timeout_s: int, rt, paths: RunPaths) -> Iterator[Progress]:
    """Phase marks and step statistics for the loop; with hang_timeout_s > 0 also the watchdog thread
    (heartbeat file, stack dump, exit), which stops and writes a last heartbeat on the way out."""
    progress = Progress(rt)
    dog = None
    if hang_timeout_s > 0:
        dog = Watchdog(progress, paths, hang_timeout_s=hang_timeout_s, cuda=rt.device.type == "cuda").start()
        # The first watchdog to fire ends the job: the launcher's SIGTERM may reach the stuck rank before its
        # own watchdog fires, so SIGTERM dumps the stacks too, then terminates as before.
        faulthandler.register(signal.SIGTERM, file=sys.stderr, all_threads=True, chain=True)
    try:
        yield progress
        progress.phase("done")  # on an exception the heartbeat keeps the phase it happened in
    finally:
        if dog is not None:
            dog.close()
