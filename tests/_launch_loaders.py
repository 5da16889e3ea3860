"""Loaders for the tests of how workers start and end.

Used by test_launch.py and test_process_pool.py.

Module level, so that every start method can import them; kept free of
pytest and Keras imports, like `_procs`. The framework each loader uses
(torch, scikit-learn, libgomp) is imported inside it, in the worker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import struct
import sys

import numpy as np

# -- Kind B: loaders that run a parallel region of GNU OpenMP ----------------


def torch_loader(ids):
    """Runs one torch matmul (torch's OpenMP pool), returns `ids * 2`."""
    import torch

    a = torch.rand(300, 300)
    (a @ a).sum()
    return np.asarray(ids) * 2


def sklearn_loader(ids):
    """Fits a small KMeans (scikit-learn's OpenMP code), returns `ids * 2`."""
    from sklearn.cluster import KMeans

    x = np.random.default_rng(0).random((2000, 4))
    KMeans(3, n_init=1, random_state=0).fit(x)
    return np.asarray(ids) * 2


def gomp_parallel(num_threads: int = 2) -> None:
    """One parallel region of libgomp, called directly through ctypes.

    Each thread of the team runs libc's `free(NULL)`: a no-op, in C, so no
    Python code runs on libgomp's threads.
    """
    path = ctypes.util.find_library("gomp")
    if path is None:
        raise OSError("libgomp is not installed")
    gomp = ctypes.CDLL(path)
    gomp.GOMP_parallel.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_uint,
    ]
    free = ctypes.cast(ctypes.CDLL(None).free, ctypes.c_void_p)
    gomp.GOMP_parallel(free, None, num_threads, 0)


def gomp_loader(ids):
    """Runs one libgomp parallel region, returns `ids * 2`."""
    gomp_parallel()
    return np.asarray(ids) * 2


def numpy_loader(ids):
    """A matmul on NumPy's OpenBLAS, returns `ids * 2`."""
    a = np.random.default_rng(0).random((300, 300))
    (a @ a).sum()
    return np.asarray(ids) * 2


def start_native_thread() -> None:
    """Starts a thread in C that no Python code knows of: it sleeps 1000 s.

    `pthread_create` with libc's `sleep` as the start routine and 1000 as
    its argument (the argument travels in the first register, where `sleep`
    reads its `unsigned int`).
    """
    libc = ctypes.CDLL(None)
    thread = ctypes.c_ulong()
    sleep = ctypes.cast(libc.sleep, ctypes.c_void_p)
    err = libc.pthread_create(ctypes.byref(thread), None, sleep, ctypes.c_void_p(1000))
    if err:
        raise OSError(err, os.strerror(err))


# -- Kind D: a worker that breaks its own stream, loaders that start processes --


def garbage_loader(ids):
    """Batches holding sample id 2 first write a frame that does not unpickle.

    The frame goes straight onto the worker's socket (found in the caller's
    frames), ahead of the real reply: the parent's stream from this worker
    cannot be trusted any more, though the worker itself goes on running.
    """
    if 2 in np.asarray(ids).tolist():
        frame = sys._getframe()
        while frame is not None and "conn" not in frame.f_locals:
            frame = frame.f_back
        assert frame is not None, "no worker connection in the stack"
        os.write(frame.f_locals["conn"].fileno(), struct.pack("!i", 4) + b"JUNK")
    return np.asarray(ids) * 2


def square_in(x):
    """`(x * x, pid)`: run in a loader's own multiprocessing pool."""
    return x * x, os.getpid()


def _record(pids, path) -> None:
    with open(path, "a") as f:
        f.write("".join(f"{p}\n" for p in pids))


_POOL = None


def lazy_pool_loader(ids, path):
    """Squares `ids` in a `multiprocessing.Pool(2)` made at the first call.

    The pool lives as long as the worker; the pids of its processes go to
    `path`, one per line.
    """
    global _POOL
    if _POOL is None:
        _POOL = multiprocessing.Pool(2)
        _record([p.pid for p in _POOL._pool], path)  # type: ignore[attr-defined]
    out = _POOL.map(square_in, [int(i) for i in ids])
    return np.array([v for v, _ in out])


def per_call_pool_loader(ids, path):
    """Squares `ids` in a `multiprocessing.Pool(2)` made for this call only."""
    with multiprocessing.Pool(2) as pool:
        _record([p.pid for p in pool._pool], path)  # type: ignore[attr-defined]
        out = pool.map(square_in, [int(i) for i in ids])
    return np.array([v for v, _ in out])


def read_pids(path) -> list[int]:
    try:
        with open(path) as f:
            return [int(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def exiting_init(index):
    """A `worker_init` that ends its worker before it is ready."""
    os._exit(3)


_SLEEPER = None


def sleeper_loader(ids, path):
    """Starts, at its first call, a child that sleeps 120 s; returns `ids ** 2`.

    The child (a plain `subprocess.Popen`, pid written to `path`) never ends
    by itself while the worker lives or after: only the pool can end it.
    """
    global _SLEEPER
    if _SLEEPER is None:
        import subprocess

        _SLEEPER = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"]
        )
        _record([_SLEEPER.pid], path)
    return np.asarray(ids) ** 2
