"""Loaders that keep or share zero-copy arrays, for tests/test_transport.py.

Kept free of pytest and Keras imports, like `_procs.py`: a worker started
as a fresh interpreter imports this module to unpickle them. Each loader
returns batches whose rows are filled with their sample ids, so that a
batch's expected value is `expected(ids)` whatever the loader does inside.
"""

from __future__ import annotations

import numpy as np

from keras_oom import batch_array

ROW = 8192  # float32: 32 KiB per sample, 128 KiB per batch of 4 (shared memory)
BATCH = 4

_KEPT: np.ndarray | None = None  # allocated at the first batch, in the worker
_RING: np.ndarray | None = None
_CALLS = 0


def expected(ids) -> np.ndarray:
    return np.repeat(np.asarray(ids, np.float32)[:, None], ROW, axis=1)


def _kept(rows: int = BATCH) -> np.ndarray:
    global _KEPT
    if _KEPT is None:
        _KEPT = batch_array((rows, ROW), np.float32)
    return _KEPT


def refilled_loader(ids):
    """Keeps one batch_array, allocated once, and refills it for every batch."""
    out = _kept()
    out[:] = np.asarray(ids, np.float32)[:, None]
    return out


def refilled_view_loader(ids):
    """Returns a view (rows 2..) of one kept batch_array, refilled each batch."""
    out = _kept(BATCH + 2)[2:]
    out[:] = np.asarray(ids, np.float32)[:, None]
    return out


def ring_loader(ids):
    """Double buffering: two slots of one kept batch_array, used in turn."""
    global _RING, _CALLS
    if _RING is None:
        _RING = batch_array((2, BATCH, ROW), np.float32)
    out = _RING[_CALLS % 2]
    _CALLS += 1
    out[:] = np.asarray(ids, np.float32)[:, None]
    return out


def twice_loader(ids):
    """The same kept batch_array twice in one batch."""
    out = refilled_loader(ids)
    return {"a": out, "b": out}


def constant_loader(ids):
    """A constant batch, built once in a kept batch_array and returned as is."""
    global _KEPT
    if _KEPT is None:
        _KEPT = batch_array((BATCH, ROW), np.float32)
        _KEPT[:] = np.arange(ROW, dtype=np.float32)
    return _KEPT


def constant_value() -> np.ndarray:
    return np.tile(np.arange(ROW, dtype=np.float32), (BATCH, 1))


def fresh_loader(ids):
    """The common case: a fresh batch_array per batch, nothing kept."""
    out = batch_array((len(ids), ROW), np.float32)
    out[:] = np.asarray(ids, np.float32)[:, None]
    return out


def init_kept(index):
    """worker_init: keeps a batch_array in the worker's globals."""
    global _KEPT
    _KEPT = batch_array((BATCH, ROW), np.float32)


def init_kept_loader(ids):
    """Refills the array that `init_kept` allocated."""
    assert _KEPT is not None
    _KEPT[:] = np.asarray(ids, np.float32)[:, None]
    return _KEPT


def row_sums(row, ids):
    """Dataset B's loader: a captured row (of dataset A's batch) summed per id."""
    return np.full(len(ids), row.sum(dtype=np.float64))


def sample_row(i):
    """For stack_samples: one 32 KiB sample filled with its id."""
    return np.full(ROW, i, np.float32)


def batch_array_cases() -> list:
    """`(make_shape, dtype, order)` inputs where `batch_array` and `np.empty`
    could differ; `make_shape()` builds a fresh shape (generators run once)."""
    sub = np.dtype((np.float32, (3,)))
    pair = np.dtype([("a", np.float32), ("b", np.int64)])
    return [
        (lambda: map(int, ["4", "16384"]), np.float32, "C"),
        (lambda: (d for d in (4, 16384)), np.float32, "C"),
        (lambda: np.array(20000), np.float32, "C"),
        (lambda: np.int64(20000), np.float32, "C"),
        (lambda: np.array([4, 16384]), np.float32, "C"),
        (lambda: [np.array(4), np.uint16(16384)], np.float32, "C"),
        (lambda: (8, 4096), sub, "C"),
        (lambda: (8, 4096), sub, "F"),
        (lambda: (128, 256), np.float64, "F"),
        (lambda: (4096,), pair, "C"),
        (lambda: (100, 100), object, "C"),
        (lambda: (4, -1), np.float32, "C"),
        (lambda: (2**62, 2**62), np.float32, "C"),
        (lambda: 2**70, np.float32, "C"),
        (lambda: (4.0, 2), np.float32, "C"),
        (lambda: True, np.float32, "C"),
        (lambda: None, np.float32, "C"),
        (lambda: "12", np.float32, "C"),
        (lambda: (4, 16384), "not a dtype", "C"),
        (lambda: (4, 16384), np.float32, "A"),
        (lambda: (), "V70000", "C"),
        (lambda: range(3, 6), np.uint8, "C"),
    ]


def describe_array(make) -> str:
    """What `make()` gives: shape, dtype, strides, contiguity; or its error type."""
    try:
        a = make()
    except Exception as e:
        return type(e).__name__
    flags = (a.flags.c_contiguous, a.flags.f_contiguous, a.flags.writeable)
    return f"{a.shape} {a.dtype.str} {a.strides} {flags}"


def call_batch_array(case):
    """`batch_array` on a case; `order` passed only when it is not the default."""
    make_shape, dtype, order = case
    if order == "C":
        return batch_array(make_shape(), dtype)
    return batch_array(make_shape(), dtype, order)


def batch_array_loader(ids):
    """Describes `batch_array` for each case of `batch_array_cases()`, in the worker."""
    cases = batch_array_cases()
    return np.array(
        [describe_array(lambda c=cases[int(i)]: call_batch_array(c)) for i in ids]
    )
