"""Loaders for tests/test_stats.py, each built to produce one verdict.

Module level (and free of pytest and Keras), so that workers started as
fresh interpreters can import them.
"""

from __future__ import annotations

import os
import time

import numpy as np

# An in-memory table, as an HDF5 dataset in the page cache is: reading rows
# is a memory copy and nothing else.
TABLE = np.arange(4096 * 16, dtype=np.float32).reshape(4096, 16)


def copy_rows(ids):
    """Copies the rows `ids` out of an in-memory table (h5py-like reads)."""
    return TABLE[np.sort(np.asarray(ids))]


def instant(ids):
    """Costs nothing: whatever waits, it is not the loader."""
    return np.asarray(ids, dtype=np.float32)


def waiting(ids, seconds=0.02):
    """Waits as a loader reading remote storage does, using no CPU."""
    time.sleep(seconds)
    return np.asarray(ids, dtype=np.float32)


def held(ids, started, fifo):
    """Announces itself in `started`, then blocks until `fifo` is written.

    Reading a FIFO blocks until a writer opens it, so the batch provably
    stays in the loader until the test lets it go.
    """
    tmp = f"{started}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, started)
    with open(fifo, "rb") as f:
        f.read(1)
    return np.asarray(ids)


def spin(ids, cpu_seconds=0.01):
    """Computes for `cpu_seconds` of CPU time, however busy the machine is."""
    start = time.process_time()
    while time.process_time() - start < cpu_seconds:
        pass
    return np.asarray(ids, dtype=np.float32)
