"""`diagnose()`: the verdict `PrefetchLoaderDataset.stats()` gives, and the
next step.

A pure function of a handful of numbers (`Signals`), so that the tests feed
it numbers directly; stats.py measures them.

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
from typing import NamedTuple

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
