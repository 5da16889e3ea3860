"""Recipe: train on the rows of a memory-mapped `.npy` file.

`np.load(path, mmap_mode="r")` maps a file far larger than memory; reading
rows copies only those rows. Two things to know:

- **Open the map in each process, from the path.** A `np.memmap` pickles
  as a full in-memory copy of the array, so a loader that holds one would
  send the whole file to every worker started as a fresh interpreter. The
  loader below keeps the path and maps the file on its first call.
- **Reading rows that are already in the page cache only copies memory**,
  and moving the batch to the training process costs about as much: then a
  plain `LoaderDataset` is as fast as a pool, or faster. `stats()` tells you
  (its verdict is `loader-too-cheap`); from a slow or network disk, the pool
  overlaps the reads.

    python examples/npy_memmap.py               # a small file, made here
    python examples/npy_memmap.py --file rows.npy

Needs keras-oom and a Keras backend (JAX by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_oom import LoaderDataset, PrefetchLoaderDataset  # noqa: E402


class NpyRows:
    """Loads rows of a `.npy` file, mapped once in each process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._rows: np.ndarray | None = None

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if self._rows is None:
            self._rows = np.load(self.path, mmap_mode="r")
        # Sorted reads walk the file forwards (kinder to a disk); the
        # inverse permutation restores the batch's order.
        unique, inverse = np.unique(ids, return_inverse=True)
        return np.asarray(self._rows[unique], dtype="float32")[inverse]

    def __getstate__(self) -> dict:
        return {"path": self.path, "_rows": None}  # the path, not the map


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, help="a 2-D .npy file (default: made)")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="keras-oom-npy-") as tmp:
        path = args.file
        if path is None:
            path = Path(tmp) / "rows.npy"
            rows = np.arange(args.rows * 16, dtype="float32").reshape(-1, 16)
            np.save(path, rows / rows.size)
        mapped = np.load(path, mmap_mode="r")
        n, width = mapped.shape
        labels = (np.arange(n) % 2).astype("float32")
        loader = NpyRows(str(path))
        ids = np.arange(n)

        # The same batches either way; the pool only changes where they load.
        serial = LoaderDataset(loader, ids, labels, batch_size=64, shuffle=True, seed=0)
        with PrefetchLoaderDataset(
            loader, ids, labels, batch_size=64, shuffle=True, seed=0, num_workers=2
        ) as pool:
            for i in range(len(pool)):
                x, y = pool[i]
                want = pool.batch_ids(i)
                assert np.array_equal(x, mapped[want]), f"batch {i} differs"
                assert np.array_equal(x, serial[i][0])
            print(f"Checked {len(pool)} shuffled batches against the map")
        print(f"Pool, reading ahead: {pool.stats()['diagnosis']}")

        model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        history = model.fit(serial, epochs=args.epochs, shuffle=False, verbose=0)

    print(f"Trained {args.epochs} epochs, loss {history.history['loss'][-1]:.4f}")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
