"""Memory and process probes, read from /proc.

The process-tree helpers (`descendants`, `worker_descendants`, `wait_gone`)
are the tests' own, from `tests/_procs.py`: one place reads /proc's process
tree for both the test suite and the benchmark. This module adds what only
the benchmark needs: memory figures and a sampler thread.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

import _procs  # noqa: E402  (tests/_procs.py: free of pytest and Keras)

descendants = _procs.descendants
worker_descendants = _procs.worker_descendants
cmdline = _procs.cmdline


def _status_kib(pid: int, fields: tuple[str, ...]) -> int:
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(fields):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return total


def private_rss(pid: int | None = None) -> int:
    """Bytes of anonymous and shared-memory pages resident in `pid`.

    File-backed pages (the memmap's page cache, shared libraries) are left
    out: every process that reads the memmap maps up to the whole file.
    """
    pid = os.getpid() if pid is None else pid
    return 1024 * _status_kib(pid, ("RssAnon:", "RssShmem:"))


def proportional_rss(pid: int) -> int:
    """Anonymous + shared-memory PSS of `pid` in bytes (copy-on-write split)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 1024 * total


class MemorySampler:
    """Samples parent and child memory in a thread while a contender runs.

    The parent's anonymous + shared-memory RSS is read every `interval`
    (cheap: /proc/PID/status). Children are found, and their proportional
    set size read (smaps_rollup: too slow for every 10 ms, and plain RSS would
    count the pages forked workers share copy-on-write with the parent), every
    `child_interval`.
    """

    def __init__(self, interval: float = 0.01, child_interval: float = 0.25) -> None:
        self.interval = interval
        self.child_interval = child_interval
        self.baseline = private_rss()
        self.parent_peak = self.baseline
        self.children_samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        next_children = 0.0
        while not self._stop.is_set():
            now = time.perf_counter()
            if now >= next_children:
                next_children = now + self.child_interval
                kids = worker_descendants()
                if kids:
                    self.children_samples.append(sum(proportional_rss(k) for k in kids))
            self.parent_peak = max(self.parent_peak, private_rss())
            self._stop.wait(self.interval)

    @property
    def parent_delta(self) -> int:
        return self.parent_peak - self.baseline

    @property
    def workers_pss(self) -> int:
        """Median over the samples taken while children existed."""
        samples = self.children_samples
        return int(statistics.median(samples)) if samples else 0


def reap_children(timeout: float = 5.0) -> list[str]:
    """Waits for worker processes to go; returns descriptions of leftovers."""
    deadline = time.monotonic() + timeout
    while True:
        multiprocessing.active_children()  # joins finished multiprocessing kids
        kids = worker_descendants()
        if not kids or time.monotonic() > deadline:
            return [f"{k} {cmdline(k)[:60]}" for k in sorted(kids)]
        time.sleep(0.05)
