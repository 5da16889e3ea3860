"""Sample loaders for tests/test_samples.py, importable by fresh workers.

Kept free of pytest and Keras imports, like `_procs.py`: a worker started
as a fresh interpreter imports this module to unpickle them.
"""

from __future__ import annotations

import time

import numpy as np

SHAPE = (32, 32, 3)  # float32: a batch of 8 is 96 KiB, over the memfd threshold


def plain(i):
    """No randomness: sample `i` is filled with `i`."""
    return np.full(SHAPE, i, np.float32)


def noisy(i, rng):
    """Sample `i` plus noise from its own generator; slower for odd ids, so
    that threads finish out of order."""
    if int(i) % 2:
        time.sleep(0.002)
    return rng.random(SHAPE, dtype=np.float32) + np.float32(i)


def multi(i, rng):
    """A multi-input sample: a dict holding an array and a tuple."""
    return {"x": np.full(SHAPE, i, np.float32), "y": (np.int64(i), rng.random())}


def fails_on_5(i):
    if int(i) == 5:
        raise KeyError(f"no file for sample {int(i)}")
    return np.full(SHAPE, i, np.float32)


def ragged(i):
    """Sample 4 is one row longer than the others."""
    return np.zeros((4 if int(i) == 4 else 3, 2), np.float32)


def kept_batch_loader(ids):
    """Builds its batch with batch_array, as `stack_samples` does."""
    from keras_oom import batch_array

    out = batch_array((len(ids), *SHAPE), np.float32)
    for k, i in enumerate(ids):
        out[k] = i
    return out
