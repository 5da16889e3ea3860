"""What `PrefetchLoaderDataset.stats()` measures, and the advice it gives.

Three parts, kept apart from the dataset so that each can be read and
tested alone:

- `ReadStats` counts what the caller saw: batches delivered, hits, reads
  that were not the next batch, and the seconds spent waiting. It has a
  lock of its own, never the dataset's, so `stats()` answers at once from
  a monitoring thread while another thread waits in `ds[i]` for a slow
  batch.
- `report()` turns those counts, the pool's per-worker numbers and the
  machine's CPU counters into the dict that `stats()` returns.
- `diagnose()` (diagnosis.py, re-exported here) reads a handful of
  numbers (`Signals`) and returns one verdict with the next step to take.
  It is a pure function: the tests feed it numbers directly. The
  thresholds, the verdicts and what each signal means are written there.

This module imports neither Keras nor a backend.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from typing import Any, NamedTuple

from keras_oom.diagnosis import (
    LOADER_WAITS,
    MACHINE_SATURATED,
    OUT_OF_ORDER_SHARE,
    VERDICTS,
    WAIT_BOUND,
    WORKERS_BUSY,
    Diagnosis,
    Signals,
    diagnose,
)

__all__ = [
    "LOADER_WAITS",
    "MACHINE_SATURATED",
    "OUT_OF_ORDER_SHARE",
    "VERDICTS",
    "WAIT_BOUND",
    "WORKERS_BUSY",
    "Diagnosis",
    "Mark",
    "ReadStats",
    "Signals",
    "cores",
    "dataset_report",
    "diagnose",
    "empty_report",
    "machine_cpu_times",
    "machine_share",
    "report",
    "worker_sched_ns",
]


class ReadStats:
    """The caller's side of `stats()`: counts and seconds, behind a lock.

    The lock is held only to add or copy a few numbers, so a thread that
    reads these while another waits for a batch never waits itself.

    The first batch delivered waits for the workers to start; what follows
    it is the steady state that the diagnosis reads, so its end is marked
    (`mark`) with every counter the shares are differences of.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches = 0
        self._hits = 0
        self._out_of_order = 0
        self._wait = 0.0
        self._load = 0.0
        self.mark: Mark | None = None  # set once, at the first delivery

    def hit(self) -> None:
        """A requested batch was already loaded."""
        with self._lock:
            self._hits += 1

    def delivered(self, wait: float, load: float, pool: Any) -> None:
        """A batch was handed out after `wait` seconds; it took `load` to load.

        Args:
            wait: Seconds the caller waited for it.
            load: Seconds the loader took.
            pool: The executor (executor.py), read for the mark after the
                first batch.
        """
        with self._lock:
            self._batches += 1
            self._wait += wait
            self._load += load
            first = self.mark is None
        if first:
            self.mark = Mark.now(pool, self.snapshot())

    def note_order(self, key: Any, last: Any, expected: Any) -> None:
        """Counts the read of `key` if it is not the batch after `last`.

        Re-reading `last` (TensorFlow's shape peek) and starting an epoch
        over at batch 0 are in order.
        """
        if last is None or key in (last, expected) or key[1] == 0:
            return
        with self._lock:
            self._out_of_order += 1

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of the counts."""
        with self._lock:
            return {
                "batches": self._batches,
                "hits": self._hits,
                "out_of_order": self._out_of_order,
                "wait_seconds": self._wait,
                "load_seconds": self._load,
            }


# -- the machine --------------------------------------------------------------


def cores() -> int:
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_cpu_times(path: str = "/proc/stat") -> tuple[int, int] | None:
    """`(busy, total)` clock ticks of the cores this process may run on.

    Read from the kernel's counters, so they include every process on the
    machine, not only this one and its workers. Time spent idle or waiting
    for I/O is not busy; time stolen by a hypervisor is.

    Returns:
        The two counters since boot, or `None` where `path` cannot be read
        (not Linux).
    """
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    try:
        allowed: set[int] | None = os.sched_getaffinity(0)
    except AttributeError:
        allowed = None
    busy = total = 0
    found = False
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            index = int(name[3:])
            # user nice system idle iowait irq softirq steal (guest is in user)
            ticks = [int(v) for v in rest.split()[:8]]
        except ValueError:
            continue
        if allowed is not None and index not in allowed:
            continue
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        total += sum(ticks)
        busy += sum(ticks) - idle
        found = True
    return (busy, total) if found else None


class Mark(NamedTuple):
    """Every counter at the end of the first delivered batch."""

    at: float  # time.perf_counter()
    reads: dict[str, Any]  # ReadStats.snapshot()
    process_cpu: float  # time.process_time() of this process
    worker_cpu: float  # CPU seconds the workers had reported
    worker_busy: float  # loader seconds of the live workers
    machine: tuple[int, int] | None  # machine_cpu_times()
    sched: dict[int, int]  # worker_sched_ns() of the live workers

    @classmethod
    def now(cls, pool: Any, reads: dict[str, Any]) -> Mark:
        workers = pool.worker_stats()
        return cls(
            at=time.perf_counter(),
            reads=reads,
            process_cpu=time.process_time(),
            worker_cpu=_worker_cpu(pool, workers),
            worker_busy=sum(w["busy_seconds"] for w in workers),
            machine=machine_cpu_times(),
            sched=worker_sched_ns([w["pid"] for w in workers]),
        )


def _worker_cpu(pool: Any, workers: list[dict[str, Any]]) -> float:
    return sum(w["cpu_seconds"] for w in workers) + pool.retired_cpu_seconds


def worker_sched_ns(pids: list[int]) -> dict[int, int]:
    """Per process: nanoseconds its threads ran or waited for a core.

    From /proc/<pid>/task/<tid>/schedstat (time on a CPU, time queued for
    one), summed over the process's threads, so a worker that decodes in
    threads (`stack_samples`) counts in full. A process whose counters
    cannot be read (gone, not Linux) is left out.
    """
    out: dict[int, int] = {}
    for pid in pids:
        try:
            total = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    on_cpu, queued = f.read().split()[:2]
                total += int(on_cpu) + int(queued)
        except (OSError, ValueError):
            continue
        out[pid] = total
    return out


def machine_share(start: tuple[int, int] | None) -> float | None:
    """The busy share of the cores since `start`, or `None` if unknown."""
    now = machine_cpu_times()
    if start is None or now is None or now[1] <= start[1]:
        return None
    return min(1.0, max(0.0, (now[0] - start[0]) / (now[1] - start[1])))


# -- the dict that stats() returns ----------------------------------------------


def report(
    reads: ReadStats, pool: Any, *, num_workers: int, discarded: int
) -> dict[str, Any]:
    """The numbers and the diagnosis, as `PrefetchLoaderDataset.stats()` returns.

    Reads the pool without its owner's lock: only numbers that the owning
    thread replaces whole (a float, an int, a list of slots).

    Counts and seconds are totals since the workers started; the shares,
    and so the diagnosis, cover the steady state after the first batch,
    whose wait is the workers' start-up (`startup_seconds`).

    Args:
        reads: The dataset's counts.
        pool: The executor (its `started_at`, `worker_stats()` and
            `retired_cpu_seconds`).
        num_workers: The dataset's number of workers.
        discarded: Batches loaded ahead and never used.
    """
    out = reads.snapshot()
    mark = reads.mark
    now = time.perf_counter()
    elapsed = now - pool.started_at
    workers = pool.worker_stats()
    for w in workers:
        w["utilization"] = w["busy_seconds"] / elapsed if elapsed > 0 else 0.0
    n_cores = cores()
    out["discarded"] = discarded
    out["elapsed_seconds"] = elapsed
    out["startup_seconds"] = mark.at - pool.started_at if mark else elapsed
    out["cores"] = n_cores
    out["workers"] = workers
    window = now - mark.at if mark else 0.0
    batches = out["batches"] - mark.reads["batches"] if mark else 0
    if window <= 0 or batches <= 0 or mark is None:
        return _no_data(
            out,
            "Too few batches read yet: the first one, which waits for the "
            "workers to start, is not counted."
            if out["batches"]
            else "No batches read yet.",
        )
    wait = out["wait_seconds"] - mark.reads["wait_seconds"]
    load = out["load_seconds"] - mark.reads["load_seconds"]
    busy = sum(w["busy_seconds"] for w in workers) - mark.worker_busy
    sched_now = worker_sched_ns([w["pid"] for w in workers])
    both = [pid for pid in sched_now if pid in mark.sched]
    io_wait: float | None = None
    if both and busy > 0:
        ran = sum(sched_now[pid] - mark.sched[pid] for pid in both) / 1e9
        io_wait = min(1.0, max(0.0, 1.0 - ran / busy))
    cpu = time.process_time() - mark.process_cpu
    cpu += _worker_cpu(pool, workers) - mark.worker_cpu
    machine = machine_share(mark.machine)
    out["wait_share"] = min(1.0, wait / window)
    out["worker_busy_share"] = min(1.0, max(0.0, busy / (window * num_workers)))
    out["cpu_share"] = min(1.0, max(0.0, cpu / (window * n_cores)))
    out["machine_cpu_share"] = machine
    out["worker_io_wait_share"] = io_wait
    verdict, text = diagnose(
        Signals(
            batches=batches,
            wait_share=out["wait_share"],
            worker_busy_share=out["worker_busy_share"],
            machine_cpu_share=out["cpu_share"] if machine is None else machine,
            num_workers=num_workers,
            cores=n_cores,
            discarded=discarded,
            out_of_order=out["out_of_order"],
            wait_per_batch=wait / batches,
            load_per_batch=load / batches,
            worker_io_wait_share=io_wait,
        )
    )
    out["verdict"] = verdict
    out["diagnosis"] = text
    return out


def dataset_report(
    reads: ReadStats,
    engine: Any,
    *,
    num_workers: int,
    final: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What `PrefetchLoaderDataset.stats()` returns, at any point of its life.

    Args:
        reads: The dataset's counts.
        engine: Its running `engine.Prefetcher` (its `executor` and
            `discarded`), or None when it has none (not started, or closed).
        num_workers: The dataset's number of workers.
        final: The report taken at `close()`, or None.

    Returns:
        `report()` of the running engine; else a copy of `final` (the
        caller may change it); else `empty_report()`.
    """
    if engine is not None:
        return report(
            reads,
            engine.executor,
            num_workers=num_workers,
            discarded=engine.discarded,
        )
    if final is not None:
        return copy.deepcopy(final)
    return empty_report(reads)


def empty_report(reads: ReadStats) -> dict[str, Any]:
    """The report of a dataset whose workers never started."""
    out = reads.snapshot()
    out.update(
        discarded=0,
        elapsed_seconds=0.0,
        startup_seconds=0.0,
        cores=cores(),
        workers=[],
    )
    return _no_data(out, "No batches read yet.")


def _no_data(out: dict[str, Any], diagnosis: str) -> dict[str, Any]:
    """`out` with no shares yet: too little was read to measure them."""
    out.update(
        wait_share=0.0,
        worker_busy_share=0.0,
        cpu_share=0.0,
        machine_cpu_share=None,
        worker_io_wait_share=None,
        verdict="no-data",
        diagnosis=diagnosis,
    )
    return out
