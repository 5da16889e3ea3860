"""Train a small Keras model on images stored one file per sample.

This is the keras-oom demo: scikit-learn's bundled digits (1,797 8x8 images,
shipped inside the package, no download) are written to a temporary directory
as one ``.npy`` file per image. The model never sees an in-memory array of the
whole data set: it trains on file paths, and ``PrefetchLoaderDataset`` loads
each batch's files with ``load_digits_batch`` in background workers.

Run it with ``nox -s demo`` (or ``python examples/digits_demo.py`` in an
environment that has keras-oom, a Keras backend and scikit-learn installed).
Exits non-zero if held-out accuracy is below 0.90.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from keras_oom import PrefetchLoaderDataset  # noqa: E402

SEED = 0
EPOCHS = 15
MIN_ACCURACY = 0.90


def load_digits_batch(paths: np.ndarray) -> np.ndarray:
    """Loader: the batch's file paths in, a float32 (b, 8, 8, 1) batch out.

    Defined at module level so that worker processes can import it.
    """
    return np.stack([np.load(p) for p in paths]).astype("float32")[..., None] / 16.0


def write_images(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Write every digit image to its own .npy file; return (paths, labels)."""
    digits = load_digits()
    images = digits.images.astype("uint8")  # pixel values are 0..16
    paths = []
    for i, image in enumerate(images):
        path = directory / f"digit_{i:04d}.npy"
        np.save(path, image)
        paths.append(str(path))
    return np.array(paths), digits.target.astype("int32")


def split(
    paths: np.ndarray, labels: np.ndarray, test_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle the ids once with a fixed seed and split them into train/test."""
    order = np.random.default_rng(SEED).permutation(len(paths))
    n_test = int(round(len(paths) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return paths[train], labels[train], paths[test], labels[test]


def build_model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main() -> int:
    keras.utils.set_random_seed(SEED)
    with tempfile.TemporaryDirectory(prefix="keras-oom-digits-") as tmp:
        paths, labels = write_images(Path(tmp))
        train_paths, train_labels, test_paths, test_labels = split(paths, labels)
        print(
            f"Wrote {len(paths)} images to {tmp} "
            f"({len(train_paths)} train / {len(test_paths)} held out)"
        )

        model = build_model()
        start = time.perf_counter()
        with (
            PrefetchLoaderDataset(
                load_digits_batch,
                train_paths,
                train_labels,
                batch_size=32,
                shuffle=True,
                seed=SEED,
                num_workers=2,
            ) as train,
            PrefetchLoaderDataset(
                load_digits_batch,
                test_paths,
                test_labels,
                batch_size=64,
                num_workers=2,
            ) as test,
        ):
            # The dataset shuffles its samples itself (a new order per epoch,
            # a pure function of seed and epoch), so Keras must not shuffle.
            model.fit(train, epochs=EPOCHS, shuffle=False, verbose=1)
            elapsed = time.perf_counter() - start
            stats = train.stats()
            _, accuracy = model.evaluate(test, verbose=2)

    # Was training waiting for its data? (see docs/pool.md, "stats")
    print(
        f"Input pipeline: {stats['batches']} batches, {stats['hits']} ready when "
        f"asked, {stats['wait_seconds']:.2f} s spent waiting for data"
    )
    print(f"Diagnosis: {stats['diagnosis']}")
    print(f"Training took {elapsed:.1f} s")
    print(f"Held-out accuracy: {accuracy:.4f} on {len(test_paths)} images")
    if accuracy < MIN_ACCURACY:
        print(f"FAIL: held-out accuracy below {MIN_ACCURACY:.2f}", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
