"""Recipe: train on a folder of `.npz` files, one sample per file.

Each file holds one sample's arrays (here an 8x8 image `x` and its label
`y`); the sample ids are the file paths. `stack_samples` turns a loader of
one file into a loader of batches: in a worker it writes each sample into
its row of a batch that crosses to the training process without a copy,
and `threads=2` opens two files at once in each worker (reading releases
the GIL). The sample loader returns `(x, y)`, so the dataset needs no
labels: Keras gets `(x, y)` batches.

    python examples/npz_folder.py                 # a small folder, made here
    python examples/npz_folder.py --folder samples/

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

from keras_oom import PrefetchLoaderDataset, stack_samples  # noqa: E402


def load_sample(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One sample: the file's `x` as float32 and its label `y`.

    Module level, so that workers started as fresh interpreters import it.
    """
    with np.load(path) as f:
        return f["x"].astype("float32"), f["y"].astype("float32")


def make_folder(folder: Path, samples: int) -> None:
    """Sample i: an 8x8 image filled with i / samples, labelled i % 2."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(samples):
        x = np.full((8, 8), i / samples, dtype="float16")
        np.savez(folder / f"sample_{i:06d}.npz", x=x, y=np.float32(i % 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="a folder of .npz files")
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="keras-oom-npz-") as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp)
            make_folder(folder, args.samples)
        paths = np.array(sorted(str(p) for p in folder.glob("*.npz")))

        model = keras.Sequential(
            [keras.Input((8, 8)), keras.layers.Flatten(), keras.layers.Dense(1)]
        )
        model.compile(optimizer="sgd", loss="mse")
        with PrefetchLoaderDataset(
            stack_samples(load_sample, threads=2),
            paths,
            batch_size=32,
            shuffle=True,
            seed=0,
            num_workers=2,
        ) as train:
            for i in range(len(train)):  # each row is the file its id names
                x, y = train[i]
                want = [load_sample(p) for p in train.batch_ids(i)]
                assert np.array_equal(x, np.stack([w[0] for w in want]))
                assert np.array_equal(y, np.stack([w[1] for w in want]))
            train.on_epoch_end()
            print(f"Checked {len(train)} shuffled batches against the files")
            history = model.fit(train, epochs=args.epochs, shuffle=False, verbose=0)
        stats = train.stats()

    print(f"Trained {args.epochs} epochs, loss {history.history['loss'][-1]:.4f}")
    print(f"Diagnosis: {stats['diagnosis']}")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
