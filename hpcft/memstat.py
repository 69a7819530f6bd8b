"""Memory of a process, as Linux counts it: private (RssAnon), what a job's memory limit must hold, or
all resident pages (VmRSS). Private leaves out pages of memory-mapped files (Arrow caches), which the
kernel shares between a node's processes and drops under pressure, where VmRSS counts them in every
process that touched them."""
from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from pathlib import Path


def _status_mib(field: str, pid: int | None) -> float:
    try:
        for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def private_mib(pid: int | None = None) -> float:
    """RssAnon of a process (this one by default) in MiB; 0 when it cannot be read."""
    return _status_mib("RssAnon", pid)


def rss_mib(pid: int | None = None) -> float:
    """VmRSS of a process (this one by default) in MiB: private and file-backed resident pages."""
    return _status_mib("VmRSS", pid)


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


class PrivateMemoryPeak:
    """Peak private memory (or `measure`: rss_mib) of this process, and of each worker it forks with
    workers=True, sampled every `interval` seconds in a thread while the block runs and once at its end.
    `start` is the process's reading when the block began, so `added` is what the block added."""

    def __init__(self, interval: float = 0.5, *, workers: bool = False, measure=private_mib):
        self.interval, self.with_workers, self.measure = interval, workers, measure
        self.start = self.peak = measure()
        self.workers: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpcft-memory", daemon=True)

    def __enter__(self) -> "PrivateMemoryPeak":
        self.start = self.peak = self.measure()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def added(self) -> float:
        return max(0.0, self.peak - self.start)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        self.peak = max(self.peak, self.measure())
        if self.with_workers:
            for pid in children(os.getpid()):
                self.workers[pid] = max(self.workers.get(pid, 0.0), self.measure(pid))

    def report(self) -> dict:
        out = {"process": round(self.peak)}
        if self.workers:
            out |= {"workers": len(self.workers), "largest_worker": round(max(self.workers.values()))}
        return out


M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
GLIBC_DYNAMIC_MMAP_CEILING = 32 << 20  # where glibc's own dynamic threshold stops climbing (64-bit)


@contextmanager
def large_frees_returned(threshold: int = 1 << 20):
    """glibc: while the block runs, blocks from `threshold` bytes up are mmapped, so freeing one gives
    it back to the system. Otherwise glibc's threshold climbs to the largest block freed so far, and a
    stream of transient full-size tensors (DeepSpeed's zero.Init builds each parameter whole, then keeps
    a partition) stays in the heap as free-but-resident memory: ~0.2 GB per rank on a 300M model. After
    the block: the free heap trimmed, and the thresholds glibc's dynamic adjustment would have reached
    for training's activations (mmap at 32 MiB, trim at twice that). Setting one turns glibc's
    adjustment off, and a trim threshold left at its 128 KiB default would hand the heap's top back to
    the system after every step's activations are freed and fault it in again the next step."""
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        yield
        return
    mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        trim(0)
        mallopt(M_MMAP_THRESHOLD, GLIBC_DYNAMIC_MMAP_CEILING)
        mallopt(M_TRIM_THRESHOLD, 2 * GLIBC_DYNAMIC_MMAP_CEILING)
