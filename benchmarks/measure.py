"""One measurement, in a fresh interpreter: `python -m benchmarks.measure SPEC OUT`.

SPEC is a JSON file naming the experiment (`"contender"`, `"fit"` or
`"memory"`), the workload, the data and the epochs; the result is written as
JSON to OUT. `benchmarks.run` starts one such process per contender and
repeat, so that no contender inherits another's threads, imports or memory.

A contender's trace is the time each batch was in hand, per epoch, counted
from the start of its `setup` (so the first batch includes starting workers).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses
import gc
import json
import statistics
import sys
import time
from typing import Any

import numpy as np

from benchmarks import probes
from benchmarks.contenders import BY_NAME, NUM_WORKERS, Data, batch_loader
from benchmarks.workloads import FEATURES, Workload, batch_count, touch


@dataclasses.dataclass
class Trace:
    """When each batch was in hand, per epoch, relative to construction."""

    epochs: list[list[float]]

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
        """Largest epoch-boundary gap beyond the typical batch interval."""
        if len(self.epochs) < 2:
            return 0.0
        typical = self.median_interval()
        gaps = [b[0] - a[-1] for a, b in zip(self.epochs, self.epochs[1:])]  # noqa: B905
        return max(0.0, max(gaps) - typical)


def timed_epochs(contender: Any, w: Workload, epochs: int, t0: float) -> Trace:
    """Reads `epochs` epochs, touching every batch; checks every batch's size."""
    out = []
    for e in range(epochs):
        stamps: list[float] = []
        for batch in contender.epoch():
            touch(batch)
            stamps.append(time.perf_counter() - t0)
            n = batch_count(batch)
            if n != w.batch_size:
                raise RuntimeError(
                    f"{contender.name} gave a batch of {n} samples in epoch {e}, "
                    f"expected {w.batch_size}"
                )
        if len(stamps) != w.batches_per_epoch:
            raise RuntimeError(
                f"{contender.name} gave {len(stamps)} batches in epoch {e}, "
                f"expected {w.batches_per_epoch}"
            )
        out.append(stamps)
    return Trace(out)


def run_contender(name: str, w: Workload, data: Data, epochs: int) -> dict[str, Any]:
    """Runs contender `name` once under the memory sampler."""
    contender = BY_NAME[name]()
    reason = contender.unavailable()
    if reason is not None:
        return {"skipped": reason}
    contender.preload()
    gc.collect()
    with probes.MemorySampler() as mem:
        t0 = time.perf_counter()
        contender.setup(w, data)
        try:
            trace = timed_epochs(contender, w, epochs, t0)
        finally:
            stats = contender.teardown()
    note = contender.note
    del contender
    gc.collect()
    leftovers = probes.reap_children()
    if leftovers:
        raise RuntimeError(f"{name} left processes behind: {leftovers}")
    return {
        "epochs": trace.epochs,
        "rate": trace.rate(),
        "first_batch": trace.first_batch,
        "stall": trace.max_stall(),
        "interval": trace.median_interval(),
        "parent_delta": mem.parent_delta,
        "workers_pss": mem.workers_pss,
        "pool_stats": stats,
        "note": note,
    }


def run_fit(w: Workload, data: Data, epochs: int) -> dict[str, Any]:
    """`model.fit` on the pool vs. the same dataset read without a model."""
    import keras

    from keras_oom import PrefetchLoaderDataset

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.spans: list[tuple[float, float]] = []
            self._begin = 0.0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._begin = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.spans.append((self._begin, time.perf_counter()))

    labels = np.random.default_rng(0).integers(0, 10, w.num_samples)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(10)])
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    with PrefetchLoaderDataset(
        batch_loader(w, data),
        np.arange(w.num_samples),
        labels,
        batch_size=w.batch_size,
        num_workers=NUM_WORKERS,
        shuffle=True,
        seed=0,
    ) as ds:
        t0 = time.perf_counter()
        stamps = []
        for _ in range(epochs):
            ep = []
            for i in range(len(ds)):
                touch(ds[i])
                ep.append(time.perf_counter() - t0)
            ds.on_epoch_end()
            stamps.append(ep)
        timer = EpochTimer()
        model.fit(ds, epochs=epochs + 1, shuffle=False, verbose=0, callbacks=[timer])
        try:
            wait = float(ds.stats()["wait_seconds"])
        except (AttributeError, KeyError, TypeError):
            wait = float("nan")
        batches = len(ds)
    # The first fit epoch compiles the step: leave it out.
    fit_rate = statistics.median(batches / (b - a) for a, b in timer.spans[1:])
    leftovers = probes.reap_children()
    if leftovers:
        raise RuntimeError(f"fit left processes behind: {leftovers}")
    data_rate = Trace(stamps).rate()
    return {
        "fit_rate": fit_rate,
        "data_rate": data_rate,
        "ratio": fit_rate / data_rate,
        "wait_seconds": wait,
    }


def run_memory(w: Workload, data: Data, epochs: int) -> dict[str, Any]:
    """The parent's anon + shmem RSS before the pool and after each epoch."""
    from keras_oom import PrefetchLoaderDataset

    gc.collect()
    out = [probes.private_rss()]
    with PrefetchLoaderDataset(
        batch_loader(w, data),
        np.arange(w.num_samples),
        batch_size=w.batch_size,
        num_workers=NUM_WORKERS,
    ) as ds:
        for _ in range(epochs):
            for i in range(len(ds)):
                touch(ds[i])
            ds.on_epoch_end()
            out.append(probes.private_rss())
    leftovers = probes.reap_children()
    if leftovers:
        raise RuntimeError(f"pool left processes behind: {leftovers}")
    return {"rss": out}


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs the experiment a spec describes (see the module docstring)."""
    w = Workload(**spec["workload"])
    data = Data(
        spec["data"]["rows_path"],
        tuple(spec["data"]["jpeg_paths"]),
        spec["data"].get("folder", ""),
    )
    kind = spec["experiment"]
    if kind == "contender":
        return run_contender(spec["contender"], w, data, spec["epochs"])
    if kind == "fit":
        return run_fit(w, data, spec["epochs"])
    if kind == "memory":
        return run_memory(w, data, spec["epochs"])
    raise ValueError(f"unknown experiment: {kind!r}")


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    result = run_spec(spec)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
