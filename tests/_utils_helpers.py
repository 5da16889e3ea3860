"""Helpers for tests/test_utils_*.py, importable by worker processes.

Free of pytest and Keras imports, like `_procs.py`: workers started as fresh
interpreters import this module to unpickle the augment functions below.
"""

from __future__ import annotations

import sys

import numpy as np


def noise_augment(image, rng):
    """Adds one random offset per image, drawn from the sample's generator."""
    return image + np.float32(rng.integers(0, 1000))


def imported_marker(image, rng):
    """Channel 0 of pixel 0 set to 1.0 if the process has Keras or a backend."""
    heavy = ("keras", "jax", "torch", "tensorflow")
    out = np.array(image, copy=True)
    out.flat[0] = float(any(name in sys.modules for name in heavy))
    return out


def smooth_image(height, width, channels, seed, dtype=np.uint8, top=255):
    """A smooth pattern with edges and a little noise: a stand-in for a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    img = np.empty((height, width, channels))
    for c in range(channels):
        f = rng.uniform(1, 9, size=3)
        img[..., c] = 0.5 + 0.3 * np.sin(f[0] * x * 6 + f[1] * y * 4)
        img[..., c] += 0.2 * (x * f[2] % 1.0 > 0.5)
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * top).astype(dtype)
