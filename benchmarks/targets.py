"""The performance targets, as data, and their evaluation against a run.

Each target is a record (`Ratio`, `FirstBatch`, ...) naming what it compares;
`evaluate` turns it into a row: the target's text, what this run measured,
and pass / MISS. Nothing here explains a miss: that is written by a person,
from the numbers, in docs/performance.md's hand-written section.

A target's contender may be a tuple of names: the first one the run measured
is used (so targets on "the pool" use its best configuration once it exists,
and the plain pool until then).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks.contenders import (
    KERAS_FOLDER_GRAIN,
    KERAS_FOLDER_TF,
    KERAS_MP,
    NUM_WORKERS,
    OOM_FOLDER,
    POOL,
    POOL_BEST,
    RAY,
    SERIAL,
    TFDATA,
)

THE_POOL = (POOL_BEST, POOL)
Results = dict[str, Any]  # the run's JSON (see benchmarks.run)


@dataclasses.dataclass(frozen=True)
class Ratio:
    """`contender`'s throughput >= `at_least` x `baseline`'s, on `workload`."""

    workload: str
    contender: str | tuple[str, ...]
    baseline: str
    at_least: float


@dataclasses.dataclass(frozen=True)
class FirstBatch:
    """The pool's first batch within one serial batch time + `slack` seconds."""

    workload: str
    slack: float = 0.100


@dataclasses.dataclass(frozen=True)
class Stall:
    """The pool's worst epoch-boundary stall <= its typical batch time."""

    workload: str


@dataclasses.dataclass(frozen=True)
class ParentMemory:
    """The parent's peak memory <= baseline + `batches` batches."""

    workload: str
    batches: int = NUM_WORKERS + 2


@dataclasses.dataclass(frozen=True)
class FitRatio:
    """`model.fit` on the pool >= `at_least` of the pool's data-only rate."""

    at_least: float = 0.85


@dataclasses.dataclass(frozen=True)
class MemoryFlat:
    """The parent's memory grows < one batch after the first epoch."""

    workload: str = "transfer-bound"


Target = Ratio | FirstBatch | Stall | ParentMemory | FitRatio | MemoryFlat

TARGETS: list[Target] = [
    # Issue 15: Keras's image_dataset_from_directory, on the pool.
    Ratio("image folder", OOM_FOLDER, KERAS_FOLDER_TF, 1.5),
    Ratio("image folder", OOM_FOLDER, KERAS_FOLDER_GRAIN, 5.0),
    # Issue 17: the loader in Ray actors, against the local pool on this
    # machine (the same loader, the same 2 CPUs).
    Ratio("images, PIL", RAY, POOL, 0.8),
    # Issue 11: the image pipeline.
    Ratio("images, simplejpeg", THE_POOL, TFDATA, 1.2),
    Ratio("images, simplejpeg", THE_POOL, SERIAL, 1.9),
    Ratio("images, PIL", THE_POOL, SERIAL, 1.9),
    # The row workloads (issue 11 keeps the earlier targets).
    Ratio("transfer-bound", THE_POOL, SERIAL, 1.0),
    Ratio("transfer-bound", THE_POOL, KERAS_MP, 3.0),
    Ratio("latency-bound", THE_POOL, SERIAL, 0.9 * NUM_WORKERS),  # 0.9 of ideal
    Ratio("CPU-bound", THE_POOL, SERIAL, 1.6),
    FitRatio(0.85),
    *(FirstBatch(w) for w in ("latency-bound", "transfer-bound", "CPU-bound")),
    *(Stall(w) for w in ("latency-bound", "transfer-bound", "CPU-bound")),
    *(ParentMemory(w) for w in ("latency-bound", "transfer-bound", "CPU-bound")),
    MemoryFlat(),
]


@dataclasses.dataclass(frozen=True)
class Row:
    """One target evaluated: `passed` is None when the run could not measure it."""

    text: str
    measured: str
    passed: bool | None

    @property
    def result(self) -> str:
        return {True: "pass", False: "MISS", None: "not measured"}[self.passed]


def _pick(cells: dict[str, Any], names: str | tuple[str, ...]) -> str | None:
    for name in (names,) if isinstance(names, str) else names:
        if name in cells:
            return name
    return None


def evaluate(t: Target, res: Results) -> Row:
    """Evaluates target `t` against a run's results."""
    cells = res["cells"].get(getattr(t, "workload", ""), {})
    if isinstance(t, Ratio):
        name = _pick(cells, t.contender)
        shown = name or (t.contender if isinstance(t.contender, str) else POOL)
        text = f"{t.workload}: {shown} >= {t.at_least:g}x {t.baseline}"
        if name is None or t.baseline not in cells:
            return Row(text, "-", None)
        r = cells[name]["rate"] / cells[t.baseline]["rate"]
        return Row(text, f"{r:.2f}x", r >= t.at_least)
    if isinstance(t, FitRatio):
        text = f"model.fit with the pool >= {t.at_least:g} of its data-only rate"
        fit = res.get("fit")
        if not fit:
            return Row(text, "-", None)
        return Row(text, f"{fit['ratio']:.2f}", fit["ratio"] >= t.at_least)
    if isinstance(t, MemoryFlat):
        mem = res.get("memory") or []
        text = f"parent memory flat over {max(len(mem) - 1, 0)} epochs ({t.workload})"
        if len(mem) < 3:
            return Row(text, "-", None)
        batch = res["workloads"][t.workload]["batch_bytes"]
        growth = max(mem[2:]) - mem[1]
        return Row(
            text,
            f"growth after epoch 1: {growth / 2**20:+.1f} MiB "
            f"(limit one batch, {batch / 2**20:.0f} MiB)",
            growth <= batch,
        )
    pool_name = _pick(cells, THE_POOL)
    if isinstance(t, FirstBatch):
        slack_ms = t.slack * 1e3
        text = f"{t.workload}: first batch within one loader call + {slack_ms:.0f} ms"
    elif isinstance(t, Stall):
        text = f"{t.workload}: epoch-boundary stall <= one batch time"
    else:
        text = f"{t.workload}: parent memory <= baseline + {t.batches} batches"
    if pool_name is None or SERIAL not in cells:
        return Row(text, "-", None)
    pool = cells[pool_name]
    if isinstance(t, FirstBatch):
        limit = cells[SERIAL]["interval"] + t.slack
        return Row(
            text,
            f"{pool['first_batch'] * 1e3:.0f} ms (limit {limit * 1e3:.0f} ms)",
            pool["first_batch"] <= limit,
        )
    if isinstance(t, Stall):
        return Row(
            text,
            f"{pool['stall'] * 1e3:.1f} ms "
            f"(batch time {pool['interval'] * 1e3:.1f} ms)",
            pool["stall"] <= pool["interval"],
        )
    batch_mib = res["workloads"][t.workload]["batch_bytes"] / 2**20
    limit_mib = t.batches * batch_mib
    return Row(
        text,
        f"+{pool['parent_mib']:.1f} MiB (limit {limit_mib:.0f} MiB)",
        pool["parent_mib"] <= limit_mib,
    )


def evaluate_all(res: Results) -> list[Row]:
    return [evaluate(t, res) for t in TARGETS]
