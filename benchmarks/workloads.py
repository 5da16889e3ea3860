"""Workloads: the data written once per run, and the loaders that read it.

Three families:

- **Row workloads** (latency-, transfer- and CPU-bound) read float32 rows from
  a `.npy` memmap: `np.asarray(mm[ids])` is a real copy from the page cache,
  then a sleep or some NumPy passes.
- **Image workloads** read JPEG files cut from the sample photographs that
  scikit-image ships inside its package: decode (PIL or simplejpeg), random
  224 x 224 crop, random horizontal flip, stacked into a uint8 batch.
- **The image folder** (issue 15): the same JPEG files in one sub-folder per
  class, read by Keras's `image_dataset_from_directory` (`format="tf"` and
  `"grain"`) and by keras-oom's, resized to 224 x 224 float32 with labels.

Everything here is importable without Keras, so that the parent process (which
only plans and reports) stays light, and loaders pickle small: a loader holds
paths, never data.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = 12288  # float32 per row: 48 KiB
PAGE_FLOATS = 4096 // 4  # float32 per 4 KiB page
CROP = 224
JPEG_SIDE = 256
JPEG_QUALITY = 90
FOLDER_CLASSES = 8
FOLDER_SIDE = 224  # the folder workload's output: float32 224 x 224 x 3


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one contender is asked to load, epoch after epoch.

    Attributes:
        name: Shown in the tables; targets refer to workloads by it.
        kind: `"rows"` (the memmap), `"images"` (the JPEG files) or
            `"folder"` (the JPEG files in class folders, through
            `image_dataset_from_directory`).
        batch_size: Samples per batch.
        batches_per_epoch: Batches per epoch.
        sleep: Rows: seconds slept per batch (waiting on storage or a network).
        cpu_passes: Rows: passes of `x = np.sqrt(x * x + 1.0)` per batch.
        decoder: Images: `"pil"` or `"simplejpeg"`.
    """

    name: str
    kind: str
    batch_size: int
    batches_per_epoch: int
    sleep: float = 0.0
    cpu_passes: int = 0
    decoder: str = ""

    @property
    def num_samples(self) -> int:
        return self.batch_size * self.batches_per_epoch

    @property
    def batch_bytes(self) -> int:
        if self.kind == "folder":
            return self.batch_size * FOLDER_SIDE * FOLDER_SIDE * 3 * 4
        if self.kind == "images":
            return self.batch_size * CROP * CROP * 3
        return self.batch_size * FEATURES * 4

    @property
    def unit(self) -> str:
        """What the throughput column counts."""
        return "batches/s" if self.kind == "rows" else "images/s"

    def describe(self) -> str:
        """One line for the report."""
        if self.kind == "folder":
            return (
                f"{self.num_samples} JPEG files ({JPEG_SIDE} x {JPEG_SIDE}, quality "
                f"{JPEG_QUALITY}) in {FOLDER_CLASSES} class folders, through "
                f"`image_dataset_from_directory(image_size=({FOLDER_SIDE}, "
                f"{FOLDER_SIDE}), batch_size={self.batch_size}, seed=0)`: bilinear "
                f"resize, float32 batches ({self.batch_bytes / 2**20:.1f} MiB) "
                f"with int32 labels"
            )
        if self.kind == "images":
            return (
                f"{self.num_samples} JPEG files ({JPEG_SIDE} x {JPEG_SIDE}, "
                f"quality {JPEG_QUALITY}) decoded with {DECODER_NAMES[self.decoder]}, "
                f"random {CROP} x {CROP} crop and horizontal flip, uint8 batches of "
                f"{self.batch_size} ({self.batch_bytes / 2**20:.1f} MiB)"
            )
        extra = ""
        if self.sleep:
            extra = f", {self.sleep * 1e3:.0f} ms sleep"
        if self.cpu_passes:
            extra = f", {self.cpu_passes} passes of `x = np.sqrt(x * x + 1.0)`"
        return (
            f"{self.batch_size} x {FEATURES} float32 "
            f"({self.batch_bytes / 2**20:.0f} MiB) per batch, "
            f"{self.batches_per_epoch} batches per epoch{extra}"
        )


DECODER_NAMES = {"pil": "PIL", "simplejpeg": "simplejpeg"}


def make_workloads(quick: bool) -> list[Workload]:
    """Every workload of a run; `quick` shrinks epochs to a smoke test."""
    scale = 4 if quick else 1
    images = 2048 // scale
    return [
        Workload("latency-bound", "rows", 64, 40 // scale, sleep=0.020),
        Workload("transfer-bound", "rows", 256, 32 // scale),
        Workload("CPU-bound", "rows", 64, 40 // scale, cpu_passes=12),
        Workload("images, PIL", "images", 64, images // 64, decoder="pil"),
        Workload(
            "images, simplejpeg", "images", 64, images // 64, decoder="simplejpeg"
        ),  # noqa: E501
        Workload("image folder", "folder", 64, images // 64),
    ]


# -- row workloads ----------------------------------------------------------------


class MemmapLoader:
    """`loader(ids)`: rows `ids` of a `.npy` file, copied out of its memmap.

    Opens the memmap lazily so that the loader pickles small (for workers
    started as fresh interpreters) and each process maps the file itself.
    """

    def __init__(self, path: str, sleep: float = 0.0, cpu_passes: int = 0) -> None:
        self.path = path
        self.sleep = sleep
        self.cpu_passes = cpu_passes
        self._mm: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mm": None}

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if self._mm is None:
            self._mm = np.load(self.path, mmap_mode="r")
        x = np.asarray(self._mm[np.asarray(ids)])  # a real copy from the page cache
        if self.sleep:
            time.sleep(self.sleep)
        for _ in range(self.cpu_passes):
            x = np.sqrt(x * x + 1.0)
        return x


def write_rows(directory: str, rows: int) -> str:
    """Writes a `rows x FEATURES` float32 `.npy` file; returns its path."""
    path = os.path.join(directory, "rows.npy")
    mm = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.float32, shape=(rows, FEATURES)
    )
    rng = np.random.default_rng(0)
    for start in range(0, rows, 512):
        stop = min(rows, start + 512)
        mm[start:stop] = rng.standard_normal((stop - start, FEATURES), np.float32)
    mm.flush()
    del mm
    # Read it once so that every contender finds it in the page cache.
    np.load(path, mmap_mode="r").sum(dtype=np.float64)
    return path


# -- image workloads --------------------------------------------------------------

# skimage.data functions whose files ship inside the package (no download
# through pooch), in colour and at least JPEG_SIDE pixels on each side.
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
)


def write_jpegs(directory: str, count: int, seed: int = 0) -> list[str]:
    """Writes `count` JPEG crops of scikit-image's sample photographs.

    Each file is a random `JPEG_SIDE` x `JPEG_SIDE` crop of one of
    `SKIMAGE_PHOTOS`, saved by PIL at quality `JPEG_QUALITY`. Returns the
    paths, in order.
    """
    import skimage.data
    from PIL import Image

    photos = []
    for name in SKIMAGE_PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= JPEG_SIDE:
            photos.append(np.ascontiguousarray(img, dtype=np.uint8))
    if not photos:
        raise RuntimeError("no bundled scikit-image photograph is large enough")
    out = Path(directory) / "jpeg"
    out.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        img = photos[k % len(photos)]
        top = int(rng.integers(0, img.shape[0] - JPEG_SIDE + 1))
        left = int(rng.integers(0, img.shape[1] - JPEG_SIDE + 1))
        crop = img[top : top + JPEG_SIDE, left : left + JPEG_SIDE]
        path = out / f"{k:05d}.jpg"
        Image.fromarray(crop).save(path, quality=JPEG_QUALITY)
        paths.append(str(path))
    return paths


def write_folder(directory: str, jpeg_paths: list[str]) -> str:
    """Links the JPEG files into `FOLDER_CLASSES` class folders; returns the root.

    File `k` goes to `class_{k % FOLDER_CLASSES}/`, as a hard link (a copy
    where links are not possible), so the folder costs no disk space.
    """
    root = Path(directory) / "folder"
    for k, path in enumerate(jpeg_paths):
        sub = root / f"class_{k % FOLDER_CLASSES}"
        sub.mkdir(parents=True, exist_ok=True)
        target = sub / Path(path).name
        try:
            os.link(path, target)
        except OSError:
            target.write_bytes(Path(path).read_bytes())
    return str(root)


def decode(path: str, decoder: str) -> np.ndarray:
    """Decodes the JPEG file at `path` to an RGB uint8 array (H, W, 3)."""
    if decoder == "simplejpeg":
        import simplejpeg

        with open(path, "rb") as f:
            return simplejpeg.decode_jpeg(f.read(), colorspace="RGB")
    if decoder == "pil":
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    raise ValueError(
        f"`decoder` must be 'pil' or 'simplejpeg'. Received: decoder={decoder!r}"
    )


def augment(img: np.ndarray, rng: np.random.Generator, out: np.ndarray) -> None:
    """Writes a random `CROP` x `CROP` crop of `img`, flipped or not, to `out`."""
    top = int(rng.integers(0, img.shape[0] - CROP + 1))
    left = int(rng.integers(0, img.shape[1] - CROP + 1))
    crop = img[top : top + CROP, left : left + CROP]
    out[...] = crop[:, ::-1] if rng.random() < 0.5 else crop


class SampleLoader:
    """`sample_loader(i, rng)`: image `i`, decoded, cropped and maybe flipped.

    The per-sample function every image contender shares (torch and Grain
    call it per sample; `ImageBatchLoader` stacks it into batches).
    """

    def __init__(self, paths: list[str], decoder: str) -> None:
        if decoder not in DECODER_NAMES:
            raise ValueError(
                f"`decoder` must be one of {sorted(DECODER_NAMES)}. "
                f"Received: decoder={decoder!r}"
            )
        self.paths = paths
        self.decoder = decoder

    def __call__(self, i: Any, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((CROP, CROP, 3), np.uint8)
        augment(decode(self.paths[int(i)], self.decoder), rng, out)
        return out


class ImageBatchLoader:
    """`loader(ids)`: a uint8 batch (len(ids), CROP, CROP, 3) of images `ids`.

    Decodes each sample straight into its row of one preallocated batch.
    Randomness comes from fresh OS entropy per batch: each epoch (and each
    worker) draws different crops, as training expects.
    """

    def __init__(self, paths: list[str], decoder: str) -> None:
        self.sample = SampleLoader(paths, decoder)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng()
        out = np.empty((len(ids), CROP, CROP, 3), np.uint8)
        for k, i in enumerate(ids):
            augment(decode(self.sample.paths[int(i)], self.sample.decoder), rng, out[k])
        return out


# -- the consumer -------------------------------------------------------------------


def touch(batch: Any) -> float:
    """Reads one float per 4 KiB page, as a training step would read them all.

    Shared-memory batches are mapped lazily: without this, a consumer that
    never reads its batches would hide the cost of mapping them in.
    """
    if isinstance(batch, (tuple, list)):
        return sum(touch(b) for b in batch)
    if isinstance(batch, dict):
        return sum(touch(b) for b in batch.values())
    if not isinstance(batch, np.ndarray) and hasattr(batch, "numpy"):
        batch = batch.numpy()
    flat = np.asarray(batch).reshape(-1)
    step = PAGE_FLOATS * 4 // flat.itemsize if flat.itemsize else PAGE_FLOATS
    return float(flat[::step].sum())


def batch_count(batch: Any) -> int:
    """The number of samples in `batch` (its first array's leading axis)."""
    while isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, dict):
        return batch_count(next(iter(batch.values())))
    return int(np.shape(batch)[0])
