"""Loaders and dataset subclasses for tests/test_differential.py.

Workers import this module to unpickle what the datasets ship them (by
reference under every start method), so it lives outside the test file and
imports neither pytest nor Hypothesis. It does import keras_oom's dataset
classes, hence Keras: the datasets here are subclasses whose `load` reads
their own state (`self.level`), and a worker that receives a copy of such a
dataset needs its class anyway.

Every batch is a pure function of its sample ids, `level`, the captured
`extra` array and the batch's `rng`, so the same program gives the same
values on `LoaderDataset` (the reference) and on `PrefetchLoaderDataset`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
from typing import Any

import numpy as np

from keras_oom import batch_array, stack_samples
from keras_oom.dataset import LoaderDataset
from keras_oom.prefetch import PrefetchLoaderDataset

# float32 per row: 64 KiB, the smallest row that `batch_array` places in
# shared memory even in a batch of one.
WIDE = 16384
NARROW = 3

KINDS = (
    "plain",
    "batch_array",
    "kept_batch_array",
    "stack_samples_1",
    "stack_samples_2",
)


# -- exceptions a loader raises -------------------------------------------------


class TupleNotesError(Exception):
    """Its `__notes__` is a tuple: `add_note` refuses it (Kind C item 5)."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.__notes__ = ("the loader's own note",)


@dataclasses.dataclass(frozen=True)
class FrozenError(Exception):
    """A frozen dataclass: setting `__notes__` raises (Kind C item 5)."""

    sample: int


class LockError(Exception):
    """Does not pickle: it holds a lock."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.lock = threading.Lock()


class LoaderAbort(BaseException):
    """A `BaseException` subclass, which `except Exception` does not catch."""


ERRORS: dict[str, type[BaseException]] = {
    "ValueError": ValueError,
    "KeyError": KeyError,
    "TupleNotesError": TupleNotesError,
    "FrozenError": FrozenError,
    "LockError": LockError,
    "LoaderAbort": LoaderAbort,
}
# Those that may not survive a trip through pickle (or a worker's loop): in
# a worker they may also end the read as a keras-oom RuntimeError that
# names them. The others must reach the caller as themselves.
MAY_NOT_TRAVEL = frozenset({"FrozenError", "LockError", "LoaderAbort"})


def raise_for(sample: int, raises: dict[int, str]) -> None:
    """Raises the exception configured for `sample`, if any."""
    name = raises.get(sample)
    if name is None:
        return
    if name == "FrozenError":
        raise FrozenError(sample)
    if name == "KeyError":
        raise KeyError(f"no file for sample {sample}")
    raise ERRORS[name](f"bad sample {sample}")


class OpaqueId(int):
    """A sample id that works in the caller's process but does not pickle."""

    def __reduce__(self) -> Any:
        raise TypeError(f"cannot pickle 'OpaqueId' object (sample id {int(self)})")


# -- what a batch holds -----------------------------------------------------------


def row(sample: int, width: int) -> np.ndarray:
    """Row of `sample`: distinct per sample and per column, exact in float32."""
    return (np.arange(width, dtype=np.float32) % 991) + np.float32(sample * 1000)


def _spawn_a_child() -> None:
    """Starts and joins one process, as a loader using its own pool does."""
    child = multiprocessing.get_context("fork").Process(target=_exit_at_once)
    child.start()
    child.join()
    if child.exitcode != 0:
        raise OSError(f"the loader's child process exited with {child.exitcode}")


def _exit_at_once() -> None:
    pass


_KEPT: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}


def _kept(shape: tuple[int, ...]) -> np.ndarray:
    """One `batch_array` per process and shape, allocated once and refilled.

    Per process, so that a forked worker allocates its own (in its shared
    memory) rather than refilling the parent's.
    """
    key = (os.getpid(), shape)
    out = _KEPT.get(key)
    if out is None:
        out = _KEPT[key] = batch_array(shape, np.float32)
    return out


class Sample:
    """A sample loader for `stack_samples`: `{"x": row, "i": 7 * id}`."""

    def __init__(self, width: int, raises: dict[int, str]) -> None:
        self.width, self.raises = width, raises

    def make(self, i: Any, rng: np.random.Generator | None) -> Any:
        sample = int(i)
        raise_for(sample, self.raises)
        x = row(sample, self.width)
        if rng is not None:
            x += np.float32(rng.random())
        return {"x": x, "i": np.int64(sample * 7)}

    def __call__(self, i: Any) -> Any:
        return self.make(i, None)


class RngSample(Sample):
    """`Sample` that takes the sample's generator."""

    def __call__(self, i: Any, rng: np.random.Generator) -> Any:  # type: ignore[override]
        return self.make(i, rng)


class Batches:
    """The batch loader: one of `KINDS`, building rows with `row`.

    - "plain": a dict of fresh NumPy arrays, `{"x": rows, "i": 7 * ids}`;
    - "batch_array": the rows alone, in a fresh `batch_array`;
    - "kept_batch_array": the rows alone, in one `batch_array` kept (per
      process and shape) and refilled for every batch (Kind A item 1);
    - "stack_samples_1", "stack_samples_2": `stack_samples` of `Sample`
      with 1 or 2 threads;
    - "torch": as "plain", after a 300x300 `torch.matmul` (Kind B item 3:
      a forked worker hangs in it when the parent runs torch's OpenMP pool).

    Called as `loader(ids, rng)`; `rng` may be None.
    """

    def __init__(
        self,
        kind: str,
        width: int,
        raises: dict[int, str],
        *,
        rng: bool = False,
        spawn: bool = False,
    ) -> None:
        if kind not in (*KINDS, "torch"):
            raise ValueError(f"unknown loader kind {kind!r}")
        self.kind, self.width, self.raises, self.spawn = kind, width, raises, spawn
        self.stacked = None
        if kind.startswith("stack_samples"):
            sample = (RngSample if rng else Sample)(width, raises)
            self.stacked = stack_samples(sample, threads=int(kind[-1]))

    def __call__(self, ids: Any, rng: np.random.Generator | None) -> Any:
        if self.spawn:
            _spawn_a_child()
        if self.stacked is not None:
            return self.stacked(ids, rng)
        samples = [int(i) for i in ids]
        for sample in samples:
            raise_for(sample, self.raises)
        shape = (len(samples), self.width)
        if self.kind == "torch":
            import torch

            t = torch.ones(300, 300)
            if float(torch.matmul(t, t)[0, 0]) != 300.0:
                raise ArithmeticError("torch.matmul gave a wrong value")
        if self.kind in ("plain", "torch"):
            x = np.empty(shape, np.float32)
        elif self.kind == "batch_array":
            x = batch_array(shape, np.float32)
        else:
            x = _kept(shape)
        for k, sample in enumerate(samples):
            x[k] = row(sample, self.width)
        if rng is not None:
            x += rng.random((len(samples), 1), dtype=np.float32)
        if self.kind in ("plain", "torch"):
            return {"x": x, "i": np.array(samples, np.int64) * 7}
        return x


def capture_loader(ids: Any) -> np.ndarray:
    """Dataset A's loader for Kind A item 2: rows of 5.0 in a `batch_array`."""
    out = batch_array((len(ids), WIDE), np.float32)
    out[:] = 5.0
    return out


# -- datasets whose load reads their own state -----------------------------------


class _Curriculum:
    """`load` = the loader's batch plus `level` (and `extra[0, 7]`), in place.

    In place, so that a zero-copy batch stays the loader's own array.
    `level` is the state a subclass changes between epochs (Kind E item 9);
    `extra` an array captured from another dataset (Kind A item 2).
    """

    level: int
    extra: np.ndarray | None
    _loader: Any

    def _finish(self, x: Any) -> Any:
        shift = float(self.level)
        if self.extra is not None:
            shift += float(self.extra[0, 7])
        for leaf in leaves(x):
            if leaf.dtype.kind == "f":
                leaf += np.float32(shift)
            else:
                leaf += self.level
        return x


def leaves(x: Any) -> list[np.ndarray]:
    """The arrays of a batch: a dict, tuple or list of them, or one array."""
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in leaves(v)]
    if isinstance(x, (tuple, list)):
        return [leaf for v in x for leaf in leaves(v)]
    return [x]


class LevelDataset(_Curriculum, LoaderDataset):
    """A `LoaderDataset` whose batches depend on `self.level`."""

    def __init__(self, *args: Any, extra: np.ndarray | None = None, **kw: Any):
        self.level = 0
        self.extra = extra
        super().__init__(*args, **kw)

    def load(self, ids: np.ndarray) -> Any:
        return self._finish(self._loader(ids, None))


class LevelRngDataset(LevelDataset):
    """`LevelDataset` whose `load` takes the batch's generator."""

    def load(self, ids: np.ndarray, rng: np.random.Generator) -> Any:  # type: ignore[override]
        return self._finish(self._loader(ids, rng))


class PrefetchLevelDataset(_Curriculum, PrefetchLoaderDataset):
    """`LevelDataset`'s twin with workers."""

    def __init__(self, *args: Any, extra: np.ndarray | None = None, **kw: Any):
        self.level = 0
        self.extra = extra
        super().__init__(*args, **kw)

    def load(self, ids: np.ndarray) -> Any:
        return self._finish(self._loader(ids, None))


class PrefetchLevelRngDataset(PrefetchLevelDataset):
    """`LevelRngDataset`'s twin with workers."""

    def load(self, ids: np.ndarray, rng: np.random.Generator) -> Any:  # type: ignore[override]
        return self._finish(self._loader(ids, rng))
