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
- `diagnose()` reads a handful of numbers (`Signals`) and returns one
  verdict with the next step to take. It is a pure function: the tests
  feed it numbers directly.

The signals, and why each. Shares cover the steady state, from the end of
the first batch (which waits for the workers to start) to now:

    wait share          time the caller spent in ds[i] / elapsed time.
                        Below WAIT_BOUND, training does not wait for data.
    worker busy share   loader time of the workers / (elapsed * workers).
                        A worker that is mostly idle while the caller
                        waits means the time goes elsewhere (transfer).
    worker I/O wait     the share of that loading time the workers' threads
                        were neither on a core nor queued for one, from
                        /proc/<pid>/task/*/schedstat: a loader that waits
                        for storage or a network needs no core meanwhile.
    machine CPU share   busy time of the cores this process may run on,
                        from /proc/stat: every process on the machine,
                        not only this process tree, so a machine shared
                        with other jobs counts as busy.
    out-of-order reads  reads that were not the next batch (Keras's
                        fit(shuffle=True)): what was loaded ahead is
                        discarded, and the other numbers mean little.

The verdicts, in the order they are checked:

    out-of-order       out-of-order reads >= OUT_OF_ORDER_SHARE of reads
                       (or discards >= half the reads): fit(shuffle=False).
    model-bound        wait < WAIT_BOUND, workers busy < WORKERS_BUSY:
                       fewer workers would do.
    balanced           wait < WAIT_BOUND, workers busy: keep them.
    transfer-bound     wait >= WAIT_BOUND, workers busy < WORKERS_BUSY, the
                       caller waiting less per batch than a load takes: the
                       wait is moving batches; make them cheaper to move.
    loader-too-cheap   the same, the caller waiting at least as long per
                       batch as a load takes: moving batches costs more
                       than loading them; use `LoaderDataset`.
    more-workers       wait >= WAIT_BOUND, workers busy, and waiting on
                       I/O >= LOADER_WAITS of it: more workers overlap the
                       waits, whatever the machine's load.
    machine-saturated  wait >= WAIT_BOUND, workers busy computing, machine
                       CPU >= MACHINE_SATURATED: a cheaper loader, not more
                       workers.
    more-workers       wait >= WAIT_BOUND, workers busy computing, free
                       cores.

This module imports neither Keras nor a backend.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from typing import Any, NamedTuple

# The caller waited at least this share of the time: input-bound.
WAIT_BOUND = 0.10
# Workers loading at least this share of the time count as busy.
WORKERS_BUSY = 0.5
# The machine's cores busy at least this share of the time: saturated.
MACHINE_SATURATED = 0.85
# Reads that were not the next batch, as a share of all reads.
OUT_OF_ORDER_SHARE = 0.10
# Workers waiting (not running, not queued for a core) at least this share
# of their loading time: the loader waits on I/O.
LOADER_WAITS = 0.5
# What model-bound advice aims the workers' busy share at.
_TARGET_BUSY = 0.8

VERDICTS = (
    "no-data",
    "out-of-order",
    "model-bound",
    "balanced",
    "loader-too-cheap",
    "transfer-bound",
    "machine-saturated",
    "more-workers",
)


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
            pool: The `WorkerPool`, read for the mark after the first batch.
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


# -- the verdict --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Signals:
    """The numbers a diagnosis reads; shares are fractions in [0, 1].

    Attributes:
        batches: Batches delivered.
        wait_share: The caller's time in `ds[i]` over the elapsed time.
        worker_busy_share: The workers' loading time over elapsed time
            times the number of workers.
        machine_cpu_share: The busy share of the machine's cores (every
            process), or of this process tree where the machine's is unknown.
        num_workers: Worker processes.
        cores: Cores this process may run on.
        discarded: Batches loaded ahead and never used.
        out_of_order: Reads that were not the next batch.
        wait_per_batch: Seconds the caller waited per batch.
        load_per_batch: Seconds the loader took per batch.
        worker_io_wait_share: The share of the workers' loading time spent
            neither on a core nor queued for one (waiting for storage, a
            network, a lock), or `None` where unknown.
    """

    batches: int
    wait_share: float
    worker_busy_share: float
    machine_cpu_share: float
    num_workers: int
    cores: int
    discarded: int = 0
    out_of_order: int = 0
    wait_per_batch: float = 0.0
    load_per_batch: float = 0.0
    worker_io_wait_share: float | None = None


class Diagnosis(NamedTuple):
    verdict: str  # one of VERDICTS
    text: str  # what it means, and the next step


def diagnose(s: Signals) -> Diagnosis:
    """The verdict that `s` supports, with the next step in one sentence."""
    if s.batches <= 0:
        return Diagnosis("no-data", "No batches read yet.")
    wait, busy, machine = s.wait_share, s.worker_busy_share, s.machine_cpu_share
    n = s.num_workers
    workers = f"the {n} workers were" if n != 1 else "the worker was"
    if s.out_of_order >= OUT_OF_ORDER_SHARE * s.batches or (
        s.discarded > n and s.discarded * 2 >= s.batches
    ):
        return Diagnosis(
            "out-of-order",
            f"Batches read out of order: {s.out_of_order} of {s.batches} reads "
            f"were not the next batch, and {s.discarded} batches loaded ahead "
            f"were discarded. Call fit(..., shuffle=False) and let the dataset "
            f"shuffle the samples (shuffle=True); the other numbers mean little "
            f"until then.",
        )
    if wait < WAIT_BOUND:
        if busy < WORKERS_BUSY:
            needed = max(1, math.ceil(n * busy / _TARGET_BUSY))
            step = (
                f"fewer workers would do (num_workers={needed})"
                if needed < n
                else "the input keeps up; only a faster model step would help"
            )
            return Diagnosis(
                "model-bound",
                f"Model-bound: the caller waited for data {wait:.0%} of the "
                f"time and {workers} busy only {busy:.0%}: {step}.",
            )
        return Diagnosis(
            "balanced",
            f"Not input-bound: the caller waited for data {wait:.0%} of the "
            f"time and {workers} busy {busy:.0%}, keeping up: keep "
            f"num_workers={n}.",
        )
    if busy < WORKERS_BUSY and s.wait_per_batch < s.load_per_batch:
        return Diagnosis(
            "transfer-bound",
            f"Input-bound on moving batches: {workers} busy only {busy:.0%}, "
            f"yet the caller waited {wait:.0%} of the time "
            f"({s.wait_per_batch * 1e3:.2f} ms per batch, against "
            f"{s.load_per_batch * 1e3:.2f} ms to load one): the wait is the "
            f"transfer, not the loader. Make batches cheaper to move (fewer "
            f"bytes: a smaller dtype, smaller samples; arrays from batch_array "
            f"or stack_samples, which cross without a copy); more workers will "
            f"not help.",
        )
    if busy < WORKERS_BUSY:
        return Diagnosis(
            "loader-too-cheap",
            f"The loader is too cheap for worker processes: the caller waited "
            f"{wait:.0%} of the time ({s.wait_per_batch * 1e3:.2f} ms per "
            f"batch) while {workers} busy only {busy:.0%} "
            f"({s.load_per_batch * 1e3:.2f} ms of loading per batch), so moving "
            f"batches between processes costs more than loading them: use a "
            f"plain LoaderDataset, which loads in this process.",
        )
    io_wait = s.worker_io_wait_share
    if io_wait is not None and io_wait >= LOADER_WAITS:
        return Diagnosis(
            "more-workers",
            f"Input-bound on a loader that waits: the caller waited {wait:.0%} "
            f"of the time and {workers} busy {busy:.0%}, {io_wait:.0%} of it "
            f"waiting (for storage, a network, a lock) rather than on a core: "
            f"more workers overlap the waits, even on busy cores "
            f"(num_workers={2 * n} or more).",
        )
    if machine >= MACHINE_SATURATED:
        return Diagnosis(
            "machine-saturated",
            f"Input-bound with the machine saturated: the caller waited "
            f"{wait:.0%} of the time, {workers} busy {busy:.0%} and the "
            f"machine's {s.cores} cores {machine:.0%} (all processes): more "
            f"workers will not help; make the loader cheaper (smaller images, "
            f"preprocessed arrays, a faster decoder) or train on more cores.",
        )
    return Diagnosis(
        "more-workers",
        f"Input-bound with free cores: the caller waited {wait:.0%} of the "
        f"time, {workers} busy {busy:.0%} and the machine's {s.cores} cores "
        f"only {machine:.0%}: more workers will help (num_workers={n + 1} or "
        f"more).",
    )


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
        pool: The `WorkerPool` (its `started_at`, `worker_stats()` and
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
        out.update(
            wait_share=0.0,
            worker_busy_share=0.0,
            cpu_share=0.0,
            machine_cpu_share=None,
            worker_io_wait_share=None,
            verdict="no-data",
            diagnosis=(
                "Too few batches read yet: the first one, which waits for the "
                "workers to start, is not counted."
                if out["batches"]
                else "No batches read yet."
            ),
        )
        return out
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


def empty_report(reads: ReadStats) -> dict[str, Any]:
    """The report of a dataset whose workers never started."""
    out = reads.snapshot()
    out.update(
        discarded=0,
        elapsed_seconds=0.0,
        startup_seconds=0.0,
        wait_share=0.0,
        worker_busy_share=0.0,
        cpu_share=0.0,
        machine_cpu_share=None,
        worker_io_wait_share=None,
        cores=cores(),
        workers=[],
        verdict="no-data",
        diagnosis="No batches read yet.",
    )
    return out
