"""Recipe: train on the rows of an HDF5 dataset with h5py, shuffled.

Two things make h5py different from a NumPy array:

- **It reads a list of rows only in increasing order.** A shuffled dataset
  hands the loader its ids in random order, and `f["x"][ids]` raises
  `TypeError: Indexing elements must be in increasing order`. The loader
  sorts the ids (`np.unique`, which also drops repeats), reads, and puts the
  rows back in the batch's order with the inverse permutation that
  `np.unique(..., return_inverse=True)` returns.
- **An open file must not cross processes.** Each worker opens its own
  `h5py.File` once, in `worker_init`; the loader object pickles without it.

    python examples/hdf5_rows.py                    # a small file, made here
    python examples/hdf5_rows.py --file my.h5 --x features --y labels

Needs keras-oom, a Keras backend (JAX by default) and h5py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_oom import PrefetchLoaderDataset  # noqa: E402


class H5Rows:
    """Loads rows of one HDF5 dataset; each process opens the file itself.

    Defined at module level, so that workers started as fresh interpreters
    can rebuild it.
    """

    def __init__(self, path: str, name: str) -> None:
        self.path, self.name = path, name
        self._file: h5py.File | None = None

    def open(self, worker_index: int | None = None) -> None:
        """`worker_init`: opens the file once, in the worker that calls it."""
        self._file = h5py.File(self.path, "r")

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if self._file is None:  # a plain LoaderDataset, in this process
            self.open()
        assert self._file is not None
        # h5py wants increasing indices: read the sorted unique ids, then
        # put the rows back in the batch's (shuffled) order.
        unique, inverse = np.unique(ids, return_inverse=True)
        rows = self._file[self.name][unique]
        return rows[inverse]

    def __getstate__(self) -> dict:
        # What travels to a worker: the path and the name, never the file.
        return {"path": self.path, "name": self.name, "_file": None}


def make_file(path: Path, rows: int, features: int) -> None:
    """Writes `x` (row i is i, i + 1, ...) and a label `y` per row."""
    x = np.arange(rows, dtype="float32")[:, None] + np.arange(features)
    with h5py.File(path, "w") as f:
        f["x"] = x / rows
        f["y"] = (np.arange(rows) % 2).astype("float32")


def check(train: PrefetchLoaderDataset, path: Path, name: str, labels) -> None:
    """Every batch holds exactly the rows its ids name, in their order."""
    with h5py.File(path, "r") as f:
        x_all = f[name][:]
    for i in range(len(train)):
        x, y = train[i]
        want = train.batch_ids(i)
        assert np.array_equal(x, x_all[want]), f"batch {i} differs"
        assert np.array_equal(y, labels[want]), f"labels of batch {i} differ"
    train.on_epoch_end()
    print(f"Checked {len(train)} shuffled batches against the file")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, help="an HDF5 file (default: made)")
    parser.add_argument("--x", default="x", help="the dataset of inputs")
    parser.add_argument("--y", default="y", help="the dataset of labels")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="keras-oom-h5-") as tmp:
        path = args.file
        if path is None:
            path = Path(tmp) / "features.h5"
            make_file(path, args.rows, features=8)
        with h5py.File(path, "r") as f:
            n, width = f[args.x].shape
            labels = f[args.y][:]  # labels are small: read them once, here

        # What goes wrong without sorting:
        with h5py.File(path, "r") as f:
            try:
                f[args.x][np.array([3, 1])]
            except TypeError as e:
                print(f"Unsorted rows, straight from h5py: TypeError: {e}")

        loader = H5Rows(str(path), args.x)
        ids = np.arange(n)
        model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        with PrefetchLoaderDataset(
            loader,
            ids,
            labels,
            batch_size=64,
            shuffle=True,  # ids in random order: the loader sorts them
            seed=0,
            num_workers=args.num_workers,
            worker_init=loader.open,  # one open file per worker
        ) as train:
            if args.file is None:  # our own file: check every batch
                check(train, path, args.x, labels)
            history = model.fit(train, epochs=args.epochs, shuffle=False, verbose=0)
        stats = train.stats()

    print(f"Trained {args.epochs} epochs, loss {history.history['loss'][-1]:.4f}")
    # From the page cache, h5py's reads only copy memory, and stats() may
    # find a plain LoaderDataset faster; from a slow disk, workers pay off.
    print(f"Diagnosis: {stats['diagnosis']}")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
