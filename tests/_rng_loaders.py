"""Loaders for the reproducibility tests, importable by worker processes.

Like `_procs.py`, free of pytest, Hypothesis and Keras imports: workers
started as fresh interpreters import this module to unpickle the loaders,
and should start quickly.
"""

from __future__ import annotations

import random

import numpy as np


def rng_loader(ids, rng):
    """Each row: the id and one draw from the batch's `rng`."""
    return np.stack([ids.astype(np.float64), rng.random(len(ids))], axis=1)


def global_loader(ids):
    """Each row: the id, a draw from `np.random` and one from `random`."""
    draws = np.random.random(len(ids))
    more = np.array([random.random() for _ in ids])
    return np.stack([ids.astype(np.float64), draws, more], axis=1)


def augment_loader(ids, rng):
    """A small augmentation: the scaled id, plus noise and a random sign flip."""
    x = ids.astype(np.float32)[:, None] / 64.0
    noise = rng.normal(0.0, 0.05, size=x.shape).astype(np.float32)
    flip = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=x.shape)
    return np.concatenate([x + noise, flip], axis=1)
