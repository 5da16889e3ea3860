"""Throughput benchmark: keras-oom's worker pool against the alternatives.

Three workloads read float32 rows from a ``.npy`` memmap written to a temporary
directory (2 workers everywhere):

- latency-bound: 20 ms sleep per 3 MB batch (64 x 12288 floats),
- transfer-bound: no wait, 12 MB batches (256 x 12288 floats),
- CPU-bound: 12 elementwise NumPy passes per 3 MB batch.

Contenders, all measured in the same run and interleaved repeat by repeat:
a serial ``LoaderDataset`` loop, ``PrefetchLoaderDataset(num_workers=2)``,
a ``keras.utils.PyDataset`` driven by Keras's own ``PyDatasetAdapter`` with
``workers=2, use_multiprocessing=True`` and with ``workers=4`` threads, and
``torch.utils.data.DataLoader(num_workers=2, batch_size=None)`` when torch
imports. Also one ``model.fit`` run fed by the pool, and the parent's memory
over 20 epochs of the pool.

Prints a Markdown table and writes ``docs/performance.md`` and
``docs/performance.png``. Run from the repository root::

    KERAS_BACKEND=jax python benchmarks/throughput.py [--quick] [--repeats N]
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "jax"

import argparse
import dataclasses
import datetime
import functools
import gc
import multiprocessing
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import psutil

import keras_oom
from keras_oom import LoaderDataset, PrefetchLoaderDataset
from keras_oom.pool import default_start_method

ROOT = Path(__file__).resolve().parent.parent
FEATURES = 12288  # float32 per row: 48 KiB
NUM_WORKERS = 2
PAGE_FLOATS = 4096 // 4  # float32 per 4 KiB page

SERIAL = "serial LoaderDataset"
POOL = "PrefetchLoaderDataset"
KERAS_MP = "Keras PyDataset (2 processes)"
KERAS_THREADS = "Keras PyDataset (4 threads)"
TORCH = "torch DataLoader (2 workers)"
CONTENDERS = [SERIAL, POOL, KERAS_MP, KERAS_THREADS, TORCH]


# -- workloads and the loader ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    batch_size: int
    batches_per_epoch: int
    sleep: float = 0.0
    cpu_passes: int = 0

    @property
    def batch_bytes(self) -> int:
        return self.batch_size * FEATURES * 4


def make_workloads(quick: bool) -> list[Workload]:
    scale = 3 if quick else 1
    return [
        Workload("latency-bound", 64, 40 // scale, sleep=0.020),
        Workload("transfer-bound", 256, 32 // scale),
        Workload("CPU-bound", 64, 40 // scale, cpu_passes=12),
    ]


class MemmapLoader:
    """``loader(ids)``: rows ``ids`` of a ``.npy`` file, copied out of its memmap.

    Opens the memmap lazily so that the loader pickles small (for workers
    started as fresh interpreters) and each process maps the file itself.
    """

    def __init__(self, path: str, sleep: float = 0.0, cpu_passes: int = 0) -> None:
        self.path = path
        self.sleep = sleep
        self.cpu_passes = cpu_passes
        self._mm: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mm": None}

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if self._mm is None:
            self._mm = np.load(self.path, mmap_mode="r")
        x = np.asarray(self._mm[ids])  # a real copy from the page cache
        if self.sleep:
            time.sleep(self.sleep)
        for _ in range(self.cpu_passes):
            x = np.sqrt(x * x + 1.0)
        return x


def loader_for(workload: Workload, path: str) -> MemmapLoader:
    return MemmapLoader(path, sleep=workload.sleep, cpu_passes=workload.cpu_passes)


def write_data(directory: str, rows: int) -> str:
    """Writes a ``rows x FEATURES`` float32 ``.npy`` file; returns its path."""
    path = os.path.join(directory, "rows.npy")
    mm = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.float32, shape=(rows, FEATURES)
    )
    rng = np.random.default_rng(0)
    for start in range(0, rows, 512):
        stop = min(rows, start + 512)
        mm[start:stop] = rng.standard_normal((stop - start, FEATURES), np.float32)
    mm.flush()
    del mm
    # Read it once so that every contender finds it in the page cache.
    np.load(path, mmap_mode="r").sum(dtype=np.float64)
    return path


def touch(batch: Any) -> float:
    """Reads one float per 4 KiB page, as a training step would read them all.

    Shared-memory batches are mapped lazily: without this, a consumer that
    never reads its batches would hide the cost of mapping them in.
    """
    if isinstance(batch, (tuple, list)):
        return sum(touch(b) for b in batch)
    if isinstance(batch, dict):
        return sum(touch(b) for b in batch.values())
    if not isinstance(batch, np.ndarray) and hasattr(batch, "numpy"):
        batch = batch.numpy()
    flat = np.asarray(batch).reshape(-1)
    return float(flat[::PAGE_FLOATS].sum())


# -- memory sampling ------------------------------------------------------------


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


def private_rss(pid: int) -> int:
    """Bytes of anonymous and shared-memory pages resident in `pid`.

    File-backed pages (the memmap's page cache, shared libraries) are left
    out: every process that reads the memmap maps up to the whole file.
    """
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
        self.me = psutil.Process()
        self.baseline = private_rss(self.me.pid)
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
                try:
                    kids = self.me.children(recursive=True)
                except psutil.Error:
                    kids = []
                if kids:
                    self.children_samples.append(
                        sum(proportional_rss(k.pid) for k in kids)
                    )
            parent = private_rss(self.me.pid)
            self.parent_peak = max(self.parent_peak, parent)
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
    """Waits for child processes to go; returns descriptions of leftovers."""
    deadline = time.monotonic() + timeout
    me = psutil.Process()
    while True:
        multiprocessing.active_children()  # joins finished multiprocessing kids
        kids = [
            k for k in me.children(recursive=True) if k.status() != psutil.STATUS_ZOMBIE
        ]
        if not kids or time.monotonic() > deadline:
            return [f"{k.pid} {' '.join(k.cmdline())[:60]}" for k in kids]
        time.sleep(0.05)


# -- one run of one contender: timestamps of every batch -------------------------


@dataclasses.dataclass
class Trace:
    """When each batch was in hand, per epoch, relative to construction."""

    epochs: list[list[float]]
    parent_delta: int = 0
    workers_pss: int = 0
    note: str = ""
    pool_stats: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def first_batch(self) -> float:
        return self.epochs[0][0]

    def median_interval(self) -> float:
        """Typical batch time: the median over epochs of the mean gap.

        Workers deliver in bursts (two batches close together, then a wait), so
        the median single gap understates a batch's time; the mean does not.
        """
        return statistics.median(
            (ep[-1] - ep[0]) / (len(ep) - 1) for ep in self.epochs if len(ep) > 1
        )

    def rate(self) -> float:
        """Batches/s over whole epochs after the first (boundaries included)."""
        if len(self.epochs) == 1:
            ep = self.epochs[0]
            return (len(ep) - 1) / (ep[-1] - ep[0])
        batches = sum(len(ep) for ep in self.epochs[1:])
        return batches / (self.epochs[-1][-1] - self.epochs[0][-1])

    def max_stall(self) -> float:
        """Largest epoch-boundary gap beyond the median batch interval."""
        if len(self.epochs) < 2:
            return 0.0
        typical = self.median_interval()
        gaps = [
            b[0] - a[-1] for a, b in zip(self.epochs, self.epochs[1:], strict=False)
        ]
        return max(0.0, max(gaps) - typical)


def _timed_epochs(
    epochs: int, one_epoch: Callable[[], Any], t0: float
) -> list[list[float]]:
    out = []
    for _ in range(epochs):
        stamps: list[float] = []
        for batch in one_epoch():
            touch(batch)
            stamps.append(time.perf_counter() - t0)
        out.append(stamps)
    return out


def run_serial(w: Workload, path: str, epochs: int) -> Trace:
    t0 = time.perf_counter()
    ds = LoaderDataset(
        loader_for(w, path),
        np.arange(w.batch_size * w.batches_per_epoch),
        batch_size=w.batch_size,
    )

    def one_epoch() -> Any:
        for i in range(len(ds)):
            yield ds[i]
        ds.on_epoch_end()

    return Trace(_timed_epochs(epochs, one_epoch, t0))


def run_pool(w: Workload, path: str, epochs: int) -> Trace:
    method = default_start_method()
    t0 = time.perf_counter()
    with PrefetchLoaderDataset(
        loader_for(w, path),
        np.arange(w.batch_size * w.batches_per_epoch),
        batch_size=w.batch_size,
        num_workers=NUM_WORKERS,
    ) as ds:

        def one_epoch() -> Any:
            for i in range(len(ds)):
                yield ds[i]
            ds.on_epoch_end()

        stamps = _timed_epochs(epochs, one_epoch, t0)
        st = ds.stats()
    busy = statistics.mean(w["utilization"] for w in st["workers"])
    return Trace(
        stamps,
        note=f"workers started by {method!r}",
        pool_stats={
            "hit_rate": st["hits"] / st["batches"],
            "utilization": busy,
            "wait_share": st["wait_seconds"] / st["elapsed_seconds"],
            "load_ms": 1e3 * st["load_seconds"] / st["batches"],
        },
    )


class KerasBatches(keras.utils.PyDataset):
    """A plain Keras PyDataset over the same loader."""

    def __init__(self, loader: MemmapLoader, w: Workload, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loader = loader
        self.batch_size = w.batch_size
        self.n = w.batches_per_epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.batch_size
        return self.loader(np.arange(start, start + self.batch_size))


def _run_keras(w: Workload, path: str, epochs: int, **kwargs: Any) -> Trace:
    from keras.src.trainers.data_adapters.py_dataset_adapter import (
        PyDatasetAdapter,
    )

    t0 = time.perf_counter()
    ds = KerasBatches(loader_for(w, path), w, **kwargs)
    adapter = PyDatasetAdapter(ds, shuffle=False)

    def one_epoch() -> Any:
        adapter.on_epoch_begin()
        yield from adapter.get_numpy_iterator()
        adapter.on_epoch_end()

    try:
        stamps = _timed_epochs(epochs, one_epoch, t0)
    finally:
        if adapter.enqueuer is not None:
            adapter.enqueuer.stop()
    return Trace(stamps)


def run_keras_mp(w: Workload, path: str, epochs: int) -> Trace:
    return _run_keras(w, path, epochs, workers=NUM_WORKERS, use_multiprocessing=True)


def run_keras_threads(w: Workload, path: str, epochs: int) -> Trace:
    return _run_keras(w, path, epochs, workers=4, use_multiprocessing=False)


def torch_version() -> str | None:
    try:
        import torch
    except Exception:
        return None
    return str(torch.__version__)


def run_torch(w: Workload, path: str, epochs: int) -> Trace:
    import torch.utils.data

    class TorchBatches(torch.utils.data.Dataset):
        """Map-style: index i is the whole batch i."""

        def __init__(self) -> None:
            self.loader = loader_for(w, path)

        def __len__(self) -> int:
            return w.batches_per_epoch

        def __getitem__(self, i: int) -> np.ndarray:
            start = i * w.batch_size
            return self.loader(np.arange(start, start + w.batch_size))

    t0 = time.perf_counter()
    dl = torch.utils.data.DataLoader(
        TorchBatches(), num_workers=NUM_WORKERS, batch_size=None
    )
    return Trace(_timed_epochs(epochs, lambda: iter(dl), t0))


RUNNERS: dict[str, Callable[[Workload, str, int], Trace]] = {
    SERIAL: run_serial,
    POOL: run_pool,
    KERAS_MP: run_keras_mp,
    KERAS_THREADS: run_keras_threads,
    TORCH: run_torch,
}


def measure(name: str, w: Workload, path: str, epochs: int) -> Trace:
    """Runs one contender once under the memory sampler; checks for leftovers."""
    gc.collect()
    with MemorySampler() as mem:
        trace = RUNNERS[name](w, path, epochs)
    trace.parent_delta, trace.workers_pss = mem.parent_delta, mem.workers_pss
    leftovers = reap_children()
    if leftovers:
        raise RuntimeError(f"{name} left processes behind: {leftovers}")
    return trace


# -- aggregation ----------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    """One contender on one workload, summarised over the repeats."""

    rate: float
    first_batch: float
    stall: float
    interval: float
    parent_mib: float
    workers_mib: float
    note: str
    pool_stats: dict[str, float]


def summarise(traces: list[Trace]) -> Cell:
    med = statistics.median
    return Cell(
        rate=med(t.rate() for t in traces),
        first_batch=med(t.first_batch for t in traces),
        stall=med(t.max_stall() for t in traces),
        interval=med(t.median_interval() for t in traces),
        parent_mib=med(t.parent_delta for t in traces) / 2**20,
        workers_mib=med(t.workers_pss for t in traces) / 2**20,
        note=traces[-1].note,
        pool_stats={
            k: med(t.pool_stats[k] for t in traces) for k in traces[0].pool_stats
        },
    )


def run_matrix(
    workloads: list[Workload], path: str, contenders: list[str], epochs: int, reps: int
) -> dict[str, dict[str, Cell]]:
    results: dict[str, dict[str, Cell]] = {}
    for w in workloads:
        traces: dict[str, list[Trace]] = {c: [] for c in contenders}
        for rep in range(reps):
            for c in contenders:  # interleaved, so drift hits everyone alike
                t = measure(c, w, path, epochs)
                traces[c].append(t)
                print(
                    f"  {w.name:15s} rep {rep + 1}/{reps} {c:32s} "
                    f"{t.rate():7.1f} batches/s",
                    file=sys.stderr,
                    flush=True,
                )
        results[w.name] = {c: summarise(ts) for c, ts in traces.items()}
    return results


# -- model.fit and memory over many epochs ---------------------------------------


class EpochTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.spans: list[tuple[float, float]] = []
        self._begin = 0.0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._begin = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.spans.append((self._begin, time.perf_counter()))


def measure_fit(w: Workload, path: str, epochs: int) -> dict[str, float]:
    """`model.fit` on the pool vs. the same dataset read without a model."""
    n = w.batch_size * w.batches_per_epoch
    labels = np.random.default_rng(0).integers(0, 10, n)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(10)])
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    with PrefetchLoaderDataset(
        loader_for(w, path),
        np.arange(n),
        labels,
        batch_size=w.batch_size,
        num_workers=NUM_WORKERS,
        shuffle=True,
        seed=0,
    ) as ds:
        # Data only: the same dataset, batches read in order.
        t0 = time.perf_counter()

        def one_epoch() -> Any:
            for i in range(len(ds)):
                yield ds[i]
            ds.on_epoch_end()

        data = Trace(_timed_epochs(epochs, one_epoch, t0))
        timer = EpochTimer()
        model.fit(ds, epochs=epochs + 1, shuffle=False, verbose=0, callbacks=[timer])
        wait = ds.stats()["wait_seconds"]
    # The first fit epoch compiles the step: leave it out.
    fit_rate = statistics.median(len(ds) / (b - a) for a, b in timer.spans[1:])
    leftovers = reap_children()
    if leftovers:
        raise RuntimeError(f"fit left processes behind: {leftovers}")
    data_rate = data.rate()
    return {
        "fit_rate": fit_rate,
        "data_rate": data_rate,
        "ratio": fit_rate / data_rate,
        "wait_seconds": wait,
    }


def measure_memory_over_epochs(w: Workload, path: str, epochs: int) -> list[int]:
    """The parent's anon + shmem RSS at the end of each epoch of the pool."""
    gc.collect()
    out = [private_rss(os.getpid())]
    with PrefetchLoaderDataset(
        loader_for(w, path),
        np.arange(w.batch_size * w.batches_per_epoch),
        batch_size=w.batch_size,
        num_workers=NUM_WORKERS,
    ) as ds:
        for _ in range(epochs):
            for i in range(len(ds)):
                touch(ds[i])
            ds.on_epoch_end()
            out.append(private_rss(os.getpid()))
    leftovers = reap_children()
    if leftovers:
        raise RuntimeError(f"pool left processes behind: {leftovers}")
    return out


# -- targets ----------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    text: str
    passed: bool
    measured: str
    why: str = ""


def check_targets(
    workloads: list[Workload],
    res: dict[str, dict[str, Cell]],
    fit: dict[str, float],
    memory: list[int],
) -> list[Target]:
    by_name = {w.name: w for w in workloads}
    t: list[Target] = []
    lat, tra, cpu = res["latency-bound"], res["transfer-bound"], res["CPU-bound"]

    r = tra[POOL].rate / tra[SERIAL].rate
    t.append(Target("transfer-bound: pool >= 1.0x serial", r >= 1.0, f"{r:.2f}x"))
    if KERAS_MP in tra:
        r = tra[POOL].rate / tra[KERAS_MP].rate
        t.append(
            Target(
                "transfer-bound: pool >= 3x Keras multiprocessing",
                r >= 3.0,
                f"{r:.2f}x",
            )
        )
    r = lat[POOL].rate / (NUM_WORKERS * lat[SERIAL].rate)
    t.append(
        Target(
            "latency-bound: pool >= 0.9 of ideal (2 x serial)",
            r >= 0.9,
            f"{r:.2f} of ideal",
        )
    )
    r = cpu[POOL].rate / cpu[SERIAL].rate
    t.append(Target("CPU-bound: pool >= 1.6x serial", r >= 1.6, f"{r:.2f}x"))
    t.append(
        Target(
            "model.fit with the pool >= 0.85 of its data-only rate (latency-bound)",
            fit["ratio"] >= 0.85,
            f"{fit['ratio']:.2f}",
        )
    )
    for name, cells in res.items():
        pool, serial = cells[POOL], cells[SERIAL]
        limit = serial.interval + 0.100
        t.append(
            Target(
                f"{name}: first batch within one loader call + 100 ms",
                pool.first_batch <= limit,
                f"{pool.first_batch * 1e3:.0f} ms (limit {limit * 1e3:.0f} ms)",
            )
        )
        t.append(
            Target(
                f"{name}: epoch-boundary stall <= one batch time",
                pool.stall <= pool.interval,
                f"{pool.stall * 1e3:.1f} ms (batch time {pool.interval * 1e3:.1f} ms)",
            )
        )
        batch_mib = by_name[name].batch_bytes / 2**20
        limit_mib = (NUM_WORKERS + 2) * batch_mib
        t.append(
            Target(
                f"{name}: parent memory <= baseline + {NUM_WORKERS + 2} batches",
                pool.parent_mib <= limit_mib,
                f"+{pool.parent_mib:.1f} MiB (limit {limit_mib:.0f} MiB)",
            )
        )
    batch = by_name["transfer-bound"].batch_bytes
    growth = max(memory[2:]) - memory[1] if len(memory) > 2 else 0
    t.append(
        Target(
            f"parent memory flat over {len(memory) - 1} epochs (transfer-bound)",
            growth <= batch,
            f"growth after epoch 1: {growth / 2**20:+.1f} MiB (limit one batch, "
            f"{batch / 2**20:.0f} MiB)",
        )
    )
    return t


# -- reporting ----------------------------------------------------------------------


def results_table(res: dict[str, dict[str, Cell]]) -> str:
    rows = [
        "| workload | contender | batches/s | vs serial | first batch (ms) "
        "| max epoch stall (ms) | parent peak (MiB) | workers (MiB) |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, cells in res.items():
        serial = cells[SERIAL].rate
        for c, cell in cells.items():
            rows.append(
                f"| {name} | {c} | {cell.rate:.1f} | {cell.rate / serial:.2f}x "
                f"| {cell.first_batch * 1e3:.0f} | {cell.stall * 1e3:.1f} "
                f"| {cell.parent_mib:+.1f} | {cell.workers_mib:.0f} |"
            )
    return "\n".join(rows)


def targets_table(targets: list[Target]) -> str:
    rows = ["| target | measured | result |", "|---|---|---|"]
    for t in targets:
        rows.append(f"| {t.text} | {t.measured} | {'pass' if t.passed else 'MISS'} |")
    return "\n".join(rows)


def plot(res: dict[str, dict[str, Cell]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(res)
    contenders = list(next(iter(res.values())))
    width = 0.8 / len(contenders)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for k, c in enumerate(contenders):
        xs = [
            i + (k - (len(contenders) - 1) / 2) * width for i in range(len(workloads))
        ]
        ys = [res[w][c].rate / res[w][SERIAL].rate for w in workloads]
        bars = ax.bar(xs, ys, width, label=c)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("batches/s relative to serial")
    ax.set_title(f"Loader throughput, {NUM_WORKERS} workers, {os.cpu_count()} cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> list[str]:
    mem = psutil.virtual_memory().total / 2**30
    return [
        f"- CPU cores (`nproc`): {len(os.sched_getaffinity(0))}; RAM {mem:.0f} GiB; "
        f"{platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, "
        f"Keras {keras.__version__} (backend {keras.backend.backend()}), "
        f"torch {torch_version() or 'not installed'}, "
        f"keras-oom {keras_oom.__version__} (git {git_state()})",
        f"- Date: {datetime.date.today().isoformat()}; load average at the end of "
        f"the run: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"(other jobs share the machine)",
    ]


def write_page(
    path: Path,
    args: argparse.Namespace,
    workloads: list[Workload],
    res: dict[str, dict[str, Cell]],
    fit: dict[str, float],
    memory: list[int],
    targets: list[Target],
    notes: list[str],
) -> None:
    wl = "\n".join(
        f"- **{w.name}**: {w.batch_size} x {FEATURES} float32 "
        f"({w.batch_bytes / 2**20:.0f} MiB) per batch, {w.batches_per_epoch} batches "
        f"per epoch"
        + (f", {w.sleep * 1e3:.0f} ms sleep" if w.sleep else "")
        + (
            f", {w.cpu_passes} passes of `x = np.sqrt(x * x + 1.0)`"
            if w.cpu_passes
            else ""
        )
        for w in workloads
    )
    misses = [t for t in targets if not t.passed]
    why = "\n".join(f"- **{t.text}**: {t.why}" for t in misses) or "- none"
    mem_line = ", ".join(f"{m / 2**20:.0f}" for m in memory)
    text = f"""# Performance

How fast `PrefetchLoaderDataset` delivers batches compared with a serial
`LoaderDataset`, Keras's own `PyDataset` workers and PyTorch's `DataLoader`.
Generated by `benchmarks/throughput.py` (`nox -s bench`); numbers from one
{"quick " if args.quick else ""}run, medians of {args.repeats} repeats.

![batches/s relative to serial, per workload](performance.png)

## Machine

{chr(10).join(machine())}

The machine is shared and noisy: compare the ratios within one run, not the
absolute numbers across runs.

## Workloads

Every loader reads its rows from a `.npy` memmap in a temporary directory
(`np.asarray(mm[ids])`, a real copy from the page cache) and then:

{wl}

Each contender runs {args.epochs} epochs per repeat; the repeats are interleaved
contender by contender. The consumer reads one float per 4 KiB page of every
batch (so batches passed through shared memory are really mapped in).

- **batches/s**: over the epochs after the first, epoch boundaries included.
- **first batch**: from the start of construction to the first batch in hand.
- **max epoch stall**: the longest gap between the last batch of an epoch and
  the first of the next, minus the mean gap between batches within an epoch,
  or 0 (median over repeats of each repeat's maximum).
- **parent peak**: the parent's peak anonymous + shared-memory RSS
  (`RssAnon + RssShmem`; file-backed pages such as the memmap's page cache are
  left out: every process reading the memmap maps up to the whole file),
  sampled every 10 ms, minus its value before the contender started.
- **workers**: the child processes' proportional anonymous + shared-memory
  set size (`Pss_Anon + Pss_Shmem`, so that pages forked workers share
  copy-on-write with the parent count once), summed over the children and
  sampled every 250 ms; the median of the samples taken while they ran.

Contenders: {SERIAL} (`ds[i]` in a loop); `{POOL}(num_workers=2)`, built once
per repeat ({res["latency-bound"][POOL].note.split(";")[0]}); a
`keras.utils.PyDataset` with `workers=2, use_multiprocessing=True` and with
`workers=4` threads, driven by Keras's `PyDatasetAdapter` as `fit` drives it;
`torch.utils.data.DataLoader(num_workers=2, batch_size=None)` with default
settings (so `persistent_workers=False`: its workers restart every epoch).

## Results

{results_table(res)}

What the pool reported (`ds.stats()`, medians over repeats):

{pool_table(res)}

## model.fit

A `Dense(10)` model on the flattened rows, trained with `fit(shuffle=False)` on
the latency-bound workload through `PrefetchLoaderDataset(shuffle=True)`:
**{fit["fit_rate"]:.1f} batches/s** against {fit["data_rate"]:.1f} batches/s when
the same dataset is only read (ratio {fit["ratio"]:.2f}; the first, compiling,
epoch is left out). Time `fit` spent waiting for data: {fit["wait_seconds"]:.2f} s.

## Memory over {len(memory) - 1} epochs

Parent anonymous + shared-memory RSS (MiB) before the pool and at the end of
each epoch of the transfer-bound workload: {mem_line}.

## Targets

{targets_table(targets)}

### Why the misses

{why}
{chr(10).join(notes)}
"""
    path.write_text(text, encoding="utf-8")


def explain(
    targets: list[Target],
    workloads: list[Workload],
    res: dict[str, dict[str, Cell]],
    fit: dict[str, float],
    memory: list[int],
) -> None:
    """Attaches a plain-language reason, with this run's numbers, to each miss."""

    def pool_line(name: str) -> str:
        ps = res[name][POOL].pool_stats
        return (
            f"its workers were busy loading {ps['utilization']:.0%} of the time "
            f"({ps['load_ms']:.1f} ms of loader time per batch) and "
            f"{ps['hit_rate']:.0%} of the requests found their batch ready"
        )

    for t in targets:
        if t.passed:
            continue
        name = t.text.split(":")[0]
        if t.text.startswith("transfer-bound: pool >= 1.0x"):
            serial_ms = 1e3 * res[name][SERIAL].interval
            ps = res[name][POOL].pool_stats
            t.why = (
                f"this loader is one memory copy ({serial_ms:.1f} ms per batch "
                f"serially), so the workload is bound by memory bandwidth. Any "
                f"process pool copies each batch twice (the loader's copy in the "
                f"worker, then into shared memory; the parent maps it without a "
                f"third), and two workers copying at once share the same memory "
                f"bus: the loader alone took {ps['load_ms']:.1f} ms per batch in a "
                f"worker. Half the serial rate is the ceiling for two copies; a "
                f"pool only wins once loading costs more than copying (the other "
                f"two workloads)."
            )
        elif "3x Keras" in t.text:
            t.why = f"Keras's process pool was closer than assumed; {pool_line(name)}."
        elif t.text.startswith(("latency-bound: pool", "CPU-bound: pool")):
            ps = res[name][POOL].pool_stats
            serial_ms = 1e3 * res[name][SERIAL].interval
            if ps["load_ms"] > 1.5 * serial_ms:
                t.why = (
                    f"the same loader took {ps['load_ms']:.1f} ms per batch in a "
                    f"worker against {serial_ms:.1f} ms in the serial loop: two "
                    f"workers and the consumer share 2 cores (and this machine "
                    f"with other jobs), so each load runs slower than alone."
                )
            else:
                t.why = (
                    f"{pool_line(name)}: with one batch in flight per worker, every "
                    f"batch pays a request/reply round trip (two process wake-ups on "
                    f"a busy 2-core machine) on top of loading."
                )
        elif t.text.startswith("model.fit"):
            t.why = (
                f"the training step runs in the process that also receives the "
                f"batches; fit waited {fit['wait_seconds']:.2f} s for data in all."
            )
        elif "first batch" in t.text:
            t.why = (
                f"the workers are started {res[name][POOL].note.split('by ')[-1]} "
                f"(fresh interpreters: the default once another thread runs, here the "
                f"memory sampler, in training JAX) and each must start Python, import "
                f"NumPy and unpickle the loader before its first load: starting one "
                f"such interpreter alone took {worker_start_ms():.0f} ms here, two "
                f"start at once on 2 cores. Forked workers (the default while no "
                f"backend thread runs) serve a first batch in about 10 ms; in `fit`, "
                f"Keras's own set-up usually hides the start."
            )
        elif "stall" in t.text:
            cell = res[name][POOL]
            t.why = (
                f"the first batch of an epoch came {cell.stall * 1e3:.0f} ms later "
                f"than a typical batch ({cell.interval * 1e3:.0f} ms). The pool's "
                f"window does run across epoch boundaries, so this is one slow "
                f"batch landing on a boundary (see the loader time above), not a "
                f"missing prefetch."
            )
        elif "memory flat" in t.text:
            last = max(i for i in range(1, len(memory)) if memory[i] > memory[i - 1])
            t.why = (
                f"the parent's memory rose once more, at epoch {last} (one more "
                f"recycled buffer, when a batch was still held as its worker "
                f"finished the next), and stayed flat for the remaining "
                f"{len(memory) - 1 - last} epochs: a bounded step, not a leak."
            )
        elif "parent memory" in t.text:
            w = next(w for w in workloads if w.name == name)
            held = res[name][POOL].parent_mib / (w.batch_bytes / 2**20)
            t.why = (
                f"the parent keeps every shared-memory buffer the workers recycle "
                f"mapped, not only the batches in use: {held:.1f} batches' worth "
                f"(each worker keeps one free buffer besides those lent out and "
                f"the one it fills, sized up to whole MiB). That is the price of "
                f"recycling, which makes a transfer about ten times cheaper than "
                f"a fresh shared-memory file per batch; it is bounded and does "
                f"not grow with epochs."
            )


@functools.cache
def worker_start_ms() -> float:
    """Median wall time of a fresh interpreter importing what a worker needs."""
    code = "import keras_oom.worker"
    times = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def pool_table(res: dict[str, dict[str, Cell]]) -> str:
    rows = [
        "| workload | requests served ready | worker busy (loading) "
        "| parent waiting | loader ms/batch (workers) | loader ms/batch (serial) |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for name, cells in res.items():
        ps = cells[POOL].pool_stats
        rows.append(
            f"| {name} | {ps['hit_rate']:.0%} | {ps['utilization']:.0%} "
            f"| {ps['wait_share']:.0%} | {ps['load_ms']:.1f} "
            f"| {cells[SERIAL].interval * 1e3:.1f} |"
        )
    return "\n".join(rows)


def git_state() -> str:
    import subprocess

    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "keras_oom"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes to keras_oom/" if dirty else "")


# -- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1-minute run")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per cell")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per repeat")
    parser.add_argument(
        "--no-torch", action="store_true", help="skip the torch DataLoader"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs", help="where to write the page"
    )
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.epochs = args.epochs or (2 if args.quick else 3)
    if args.repeats < 1 or args.epochs < 1:
        parser.error("--repeats and --epochs must be at least 1")

    workloads = make_workloads(args.quick)
    notes: list[str] = []
    contenders = list(CONTENDERS)
    if args.no_torch or torch_version() is None:
        contenders.remove(TORCH)
        notes.append("\ntorch is not installed (or was skipped): no DataLoader row.")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="keras_oom_bench_") as tmp:
        rows = max(w.batch_size * w.batches_per_epoch for w in workloads)
        path = write_data(tmp, rows)
        print(
            f"data: {rows} x {FEATURES} float32 "
            f"({rows * FEATURES * 4 / 2**20:.0f} MiB) in {tmp}",
            file=sys.stderr,
        )
        res = run_matrix(workloads, path, contenders, args.epochs, args.repeats)
        lat = next(w for w in workloads if w.name == "latency-bound")
        tra = next(w for w in workloads if w.name == "transfer-bound")
        fit = measure_fit(lat, path, max(2, args.epochs))
        memory = measure_memory_over_epochs(tra, path, 5 if args.quick else 20)

    targets = check_targets(workloads, res, fit, memory)
    explain(targets, workloads, res, fit, memory)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(res, args.out / "performance.png")
    write_page(
        args.out / "performance.md", args, workloads, res, fit, memory, targets, notes
    )

    print(results_table(res))
    print()
    print(
        f"model.fit with the pool: {fit['fit_rate']:.1f} batches/s vs "
        f"{fit['data_rate']:.1f} data-only ({fit['ratio']:.2f})"
    )
    print(
        "parent memory per epoch (MiB): "
        + ", ".join(f"{m / 2**20:.0f}" for m in memory)
    )
    print()
    print(targets_table(targets))
    print(
        f"\n{time.perf_counter() - started:.0f} s; wrote {args.out / 'performance.md'}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
