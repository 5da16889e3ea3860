"""Recipe: train on the rows of a Parquet file with pyarrow.

A Parquet file stores its rows in row groups, each read as a whole. The
loader maps each id to its row group and its place there, reads only the
row groups the batch touches, and takes the batch's rows, in the batch's
order, from what it read. Each worker opens the file once (`worker_init`).

With `shuffle=True` a batch of 64 touches up to 64 row groups, so keep row
groups small (a few thousand rows: `row_group_size=` when writing) or the
loader reads far more than it returns. Labels, a single small column, are
read once in the training process.

    python examples/parquet_rows.py               # a small file, made here
    python examples/parquet_rows.py --file rows.parquet --label label

Needs keras-oom, a Keras backend (JAX by default) and pyarrow.
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
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from keras_oom import PrefetchLoaderDataset  # noqa: E402


class ParquetRows:
    """Loads rows of a Parquet file as a float32 `(len(ids), columns)` array."""

    def __init__(self, path: str, columns: list[str]) -> None:
        self.path, self.columns = path, columns
        self._file: pq.ParquetFile | None = None
        self._starts = np.zeros(1, dtype=np.int64)

    def open(self, worker_index: int | None = None) -> None:
        """`worker_init`: opens the file and reads where each row group starts."""
        self._file = pq.ParquetFile(self.path)
        meta = self._file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes)])

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if self._file is None:  # a plain LoaderDataset, in this process
            self.open()
        assert self._file is not None
        ids = np.asarray(ids, dtype=np.int64)
        groups = np.searchsorted(self._starts, ids, side="right") - 1
        needed = np.unique(groups)  # the row groups this batch touches
        table = self._file.read_row_groups(needed.tolist(), columns=self.columns)
        # Where each id lands in `table`, the needed row groups end to end.
        sizes = self._starts[needed + 1] - self._starts[needed]
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        where = first[np.searchsorted(needed, groups)] + ids - self._starts[groups]
        rows = table.take(pa.array(where))
        return np.stack(
            [rows.column(c).to_numpy() for c in self.columns], axis=1
        ).astype("float32")

    def __getstate__(self) -> dict:
        # What travels to a worker: the path and the columns, never the file.
        return {
            "path": self.path,
            "columns": self.columns,
            "_file": None,
            "_starts": np.zeros(1, dtype=np.int64),
        }


def make_file(path: Path, rows: int, features: int) -> None:
    """Writes columns f0.. (row i of f<k> is i + k) and a label column."""
    i = np.arange(rows)
    data = {f"f{k}": (i + k).astype("float32") / rows for k in range(features)}
    data["label"] = (i % 2).astype("float32")
    pq.write_table(pa.table(data), path, row_group_size=250)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, help="a Parquet file (default: made)")
    parser.add_argument("--label", default="label", help="the label column")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="keras-oom-parquet-") as tmp:
        path = args.file
        if path is None:
            path = Path(tmp) / "rows.parquet"
            make_file(path, args.rows, features=8)
        schema = pq.read_schema(path)
        columns = [c for c in schema.names if c != args.label]
        labels = pq.read_table(path, columns=[args.label]).column(0).to_numpy()
        loader = ParquetRows(str(path), columns)
        ids = np.arange(len(labels))

        model = keras.Sequential([keras.Input((len(columns),)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        with PrefetchLoaderDataset(
            loader,
            ids,
            labels,
            batch_size=64,
            shuffle=True,
            seed=0,
            num_workers=args.num_workers,
            worker_init=loader.open,  # one open file per worker
        ) as train:
            if args.file is None:  # our own file: check every batch
                table = pq.read_table(path, columns=columns)
                every = np.stack([table.column(c).to_numpy() for c in columns], 1)
                for i in range(len(train)):
                    x, y = train[i]
                    want = train.batch_ids(i)
                    assert np.array_equal(x, every[want]), f"batch {i} differs"
                    assert np.array_equal(y, labels[want])
                train.on_epoch_end()
                print(f"Checked {len(train)} shuffled batches against the file")
            history = model.fit(train, epochs=args.epochs, shuffle=False, verbose=0)
        stats = train.stats()

    print(f"Trained {args.epochs} epochs, loss {history.history['loss'][-1]:.4f}")
    print(f"Diagnosis: {stats['diagnosis']}")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
