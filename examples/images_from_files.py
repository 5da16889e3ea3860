"""Train an image classifier on a folder of JPEG files and a CSV of labels.

A complete training script of the kind you would write for your own data:

1. read `labels.csv` (columns `filename,label`) next to the images;
2. split the rows into train / validation / test, reproducibly by seed;
3. train with `PrefetchLoaderDataset`: worker processes read and augment
   (random crop, random flip) the next batches while the model trains, and
   `fit(..., validation_data=...)` scores the validation images every epoch;
4. `predict` on a plain list of paths and report the held-out accuracy;
5. print `stats()`: was training waiting for its data?

No data set to hand? `--make-data N` first draws N small synthetic JPEGs
(a red, green or blue shape on a grey background; the colour is the class):

    python examples/images_from_files.py --make-data 600
    python examples/images_from_files.py --make-data 600 --data shapes/
    python examples/images_from_files.py --data shapes/ --epochs 5

The first writes to a temporary folder and deletes it at the end; the
second keeps the folder; the third reuses it. Needs keras-oom, a Keras
backend (JAX by default) and Pillow.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from keras_oom import LoaderDataset, PrefetchLoaderDataset  # noqa: E402

IMAGE_SIZE = 48  # every image is brought to this size when read
CROP = 40  # the model sees CROP x CROP crops: random in training, central after
CLASSES = ("red", "green", "blue")


# -- reading and augmenting images (the loaders) -----------------------------


def read_image(path: str) -> np.ndarray:
    """Reads one file as a (IMAGE_SIZE, IMAGE_SIZE, 3) uint8 array.

    Real folders hold images of many sizes: resizing here, in the loader,
    gives every batch one shape.
    """
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE))
        return np.asarray(image)


def load_train_batch(paths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Training loader: read each image, crop it at random, maybe flip it.

    Because this function declares a parameter named `rng`, the dataset
    passes a NumPy generator derived from (seed, epoch, batch position): the
    augmentation is reproducible, the same whichever worker loads the batch,
    and different in every epoch.
    """
    batch = np.empty((len(paths), CROP, CROP, 3), dtype="float32")
    for k, path in enumerate(paths):
        image = read_image(path)
        top, left = rng.integers(0, IMAGE_SIZE - CROP + 1, size=2)
        crop = image[top : top + CROP, left : left + CROP]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]  # horizontal flip
        batch[k] = crop
    return batch / 255.0


def load_eval_batch(paths: np.ndarray) -> np.ndarray:
    """Validation and prediction loader: the central crop, no randomness."""
    start = (IMAGE_SIZE - CROP) // 2
    batch = np.stack(
        [read_image(p)[start : start + CROP, start : start + CROP] for p in paths]
    )
    return batch.astype("float32") / 255.0


# -- the data: a CSV of labels, split by seed --------------------------------


def read_labels(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads `folder/labels.csv`; returns (paths, class indices)."""
    paths, labels = [], []
    with open(folder / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            paths.append(str(folder / row["filename"]))
            labels.append(CLASSES.index(row["label"]))
    return np.array(paths), np.array(labels, dtype="int32")


def split(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of the train, validation and test sets.

    One permutation drawn from `seed`: the same seed gives the same split,
    so a validation score can be compared across runs.
    """
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    n_test = round(n * test_fraction)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def make_data(folder: Path, n: int, seed: int) -> None:
    """Draws `n` synthetic JPEGs into `folder` and writes `labels.csv`."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        for i in range(n):
            label = CLASSES[i % len(CLASSES)]
            filename = f"images/{i:05d}.jpg"
            draw_shape(label, rng).save(folder / filename, quality=90)
            writer.writerow([filename, label])


def draw_shape(label: str, rng: np.random.Generator) -> Image.Image:
    """A circle, square or triangle in the class's colour on a grey background."""
    grey = int(rng.integers(60, 200))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (grey, grey, grey))
    colour = [int(c) for c in rng.integers(0, 90, size=3)]
    colour[CLASSES.index(label)] = int(rng.integers(170, 256))
    cx, cy = rng.integers(IMAGE_SIZE // 3, 2 * IMAGE_SIZE // 3, size=2)
    r = int(rng.integers(8, 14))
    box = [int(cx) - r, int(cy) - r, int(cx) + r, int(cy) + r]
    draw = ImageDraw.Draw(image)
    kind = rng.integers(3)
    if kind == 0:
        draw.ellipse(box, fill=tuple(colour))
    elif kind == 1:
        draw.rectangle(box, fill=tuple(colour))
    else:
        draw.polygon(
            [(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=tuple(colour)
        )
    return image


# -- the model ---------------------------------------------------------------


def build_model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input(shape=(CROP, CROP, 3)),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.GlobalMaxPooling2D(),
            keras.layers.Dense(len(CLASSES), activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def predict_paths(model: keras.Model, paths: list[str]) -> list[str]:
    """Class names for a list of image files.

    A `LoaderDataset` without labels yields inputs only, which is what
    `predict` wants. No workers needed for one pass; a batch size larger
    than the list gives a single, shorter batch.
    """
    ds = LoaderDataset(load_eval_batch, paths, batch_size=64)
    probabilities = model.predict(ds, verbose=0)
    return [CLASSES[k] for k in probabilities.argmax(axis=1)]


# -- the script --------------------------------------------------------------


def train_and_evaluate(folder: Path, args: argparse.Namespace) -> float:
    paths, labels = read_labels(folder)
    train, val, test = split(
        len(paths), args.val_fraction, args.test_fraction, args.seed
    )
    print(
        f"{len(paths)} images: {len(train)} train / {len(val)} validation / "
        f"{len(test)} test"
    )

    keras.utils.set_random_seed(args.seed)
    model = build_model()
    val_ds = LoaderDataset(
        load_eval_batch, paths[val], labels[val], batch_size=args.batch_size
    )
    with PrefetchLoaderDataset(
        load_train_batch,
        paths[train],
        labels[train],
        batch_size=args.batch_size,
        shuffle=True,  # new sample order every epoch, from (seed, epoch)
        seed=args.seed,
        num_workers=args.num_workers,
    ) as train_ds:
        # The dataset shuffles its samples; Keras's shuffle=True would only
        # reorder batch requests and defeat the loading ahead.
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=args.epochs,
            shuffle=False,
            verbose=2,
        )
    stats = train_ds.stats()  # still readable after the workers have ended

    test_paths = list(paths[test])  # any list of file names will do
    predicted = predict_paths(model, test_paths)
    truth = [CLASSES[k] for k in labels[test]]
    accuracy = float(np.mean(np.array(predicted) == np.array(truth)))
    for k in range(min(3, len(test_paths))):
        name = Path(test_paths[k]).name
        print(f"  {name}: predicted {predicted[k]}, labelled {truth[k]}")

    # Was training waiting for data? See docs/pool.md, "Is training waiting
    # for data?", for how to read these numbers.
    print(
        f"Input pipeline: {stats['batches']} batches, {stats['hits']} ready "
        f"when asked, {stats['wait_seconds']:.2f} s waiting for data, "
        f"{stats['load_seconds']:.2f} s loading in {len(stats['workers'])} workers"
    )
    print(f"Diagnosis: {stats['diagnosis']}")
    print(f"Held-out accuracy: {accuracy:.4f} on {len(test)} images")
    return accuracy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, help="folder with labels.csv (default: a temporary one)"
    )
    parser.add_argument(
        "--make-data",
        type=int,
        metavar="N",
        help="first draw N synthetic images into --data (default without --data: 600)",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-accuracy",
        type=float,
        default=0.0,
        help="exit with status 1 when the held-out accuracy is lower",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="keras-oom-images-") as tmp:
        folder = args.data if args.data is not None else Path(tmp)
        n = args.make_data
        if n is None and args.data is None:
            n = 600
        if n:
            make_data(folder, n, args.seed)
            print(f"Wrote {n} images and labels.csv to {folder}")
        accuracy = train_and_evaluate(folder, args)
    if accuracy < args.min_accuracy:
        print(f"FAIL: accuracy below {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
