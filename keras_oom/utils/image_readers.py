"""Readers of image files, as Keras's `format="grain"` path reads them.

This module runs in worker processes: it imports numpy, Pillow and OpenCV
(the `images` extra), never Keras or a backend.

Keras's `image_dataset_from_directory(format="grain")` opens each file with
Pillow, converts it to the requested channels, casts it to float32 and
resizes it with `keras.ops.image.resize`. `ImageReader` does the same steps
without a backend for one file, and `ImageBatchReader` does them straight
into a batch's rows, a few files at a time in threads. The steps live in
`image_decode.py` (the file to Keras's pixels) and `image_resize.py` (crop,
pad and resize with JAX's arithmetic).

Measured against Keras 3.15's `format="grain"` output on JAX (JPEG and PNG
files from 37 x 53 to 1024 x 768 pixels resized to 224 x 224, every
supported interpolation): mean absolute difference 0.000 and maximum 0.01
on the 0-255 scale (float rounding).

CPU time per 256 x 256 JPEG (quality 90, 4:2:0) to 224 x 224, one thread,
medians of 11 interleaved rounds: reading the file 0.011 ms, OpenCV's
decode 0.23 ms (Pillow's, with its conversion to an array: 0.31 ms), the
float32 cast 0.03 ms, OpenCV's bilinear resize 0.07 to 0.09 ms (NumPy's
separable filter: 1.6 ms, bicubic 2.4 ms). The decoder is the limit.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_oom.protocol import add_note
from keras_oom.samples import batch_array
from keras_oom.utils.file_io import FileReadError
from keras_oom.utils.image_decode import decode_pixels, import_cv2, import_pil
from keras_oom.utils.image_resize import crop_box, pad_to_aspect, resize


@dataclasses.dataclass(eq=False)  # compared and hashed by identity
class ImageReader:
    """`reader(path, rng) -> image`: one file decoded, resized and augmented.

    The per-sample loader of `image_dataset_from_directory`, given to
    `keras_oom.stack_samples` (its `load_plain` method when there is no
    `augment`, so that no generator is made per sample). It pickles small
    (its arguments only) and imports Pillow and OpenCV in the process that
    calls it.

    Args:
        image_size: `(height, width)` of every image.
        num_channels: 1, 3 or 4.
        interpolation: One of `INTERPOLATIONS`.
        data_format: `"channels_last"` or `"channels_first"`.
        crop_to_aspect_ratio: Crop to the target aspect ratio first.
        pad_to_aspect_ratio: Pad to the target aspect ratio first.
        augment: `None`, or `augment(image, rng) -> image`, called with the
            resized float32 image (in `data_format`'s layout) and the
            sample's `numpy.random.Generator`.
    """

    image_size: tuple[int, int]
    num_channels: int
    interpolation: str
    data_format: str
    crop_to_aspect_ratio: bool = False
    pad_to_aspect_ratio: bool = False
    augment: Callable[[np.ndarray, np.random.Generator], Any] | None = None
    # The process that imported the decoders; -1 until the first image.
    _pid: int = dataclasses.field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pid": -1}

    def __call__(self, path: Any, rng: np.random.Generator | None = None) -> Any:
        """Reads `path`; `rng` is the sample's generator, for `augment`."""
        return self.load(path, rng)

    def load_plain(self, path: Any) -> Any:
        """As calling the reader, for `augment=None`: asks for no generator.

        `stack_samples` makes a generator per sample only for a function
        that declares `rng`; without `augment` none is needed.
        """
        return self.load(path, None)

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image's shape, in `data_format`'s layout (before `augment`)."""
        height, width = self.image_size
        if self.data_format == "channels_first":
            return (self.num_channels, height, width)
        return (height, width, self.num_channels)

    def load(self, path: Any, rng: np.random.Generator | None) -> Any:
        """Decodes, crops or pads, resizes, lays out and augments one image."""
        img = self._resized(path, None)
        if self.data_format == "channels_first":
            img = img.transpose(2, 0, 1)
        if self.augment is not None:
            img = self.augment(img, rng if rng is not None else np.random.default_rng())
        return img

    def load_into(self, path: Any, out: np.ndarray) -> None:
        """As `load_plain`, written into `out` (float32, of `shape`).

        The image goes straight into `out` (a row of the batch), with no
        array of its own in between, when the layout allows it.
        """
        if self.data_format == "channels_first":
            out[...] = self._resized(path, None).transpose(2, 0, 1)
        else:
            self._resized(path, out)

    def _resized(self, path: Any, out: np.ndarray | None) -> np.ndarray:
        if self._pid != os.getpid():
            self._setup_process()
        img = decode_pixels(str(path), self.num_channels)
        # Cropped or padded in the file's dtype, then cast once: the values
        # are integers, so the float32 result is the same.
        if self.crop_to_aspect_ratio:
            top, left, h, w = crop_box(img.shape[0], img.shape[1], self.image_size)
            img = img[top : top + h, left : left + w]
        elif self.pad_to_aspect_ratio:
            img = pad_to_aspect(img, self.image_size)
        return resize(img.astype(np.float32), self.image_size, self.interpolation, out)

    def _setup_process(self) -> None:
        # Import once per process, before the first image. OpenCV's thread
        # settings are left alone: `cv2.setNumThreads` blocks forever in a
        # process forked after its parent ran OpenCV's thread pool.
        self._pid = os.getpid()
        import_pil()
        if self.interpolation == "bilinear":
            import_cv2()


class ImageBatchReader:
    """`loader(paths, rng=None) -> images`: a float32 batch, image by image in place.

    The batch loader of `image_dataset_from_directory` without `augment`:
    it allocates the batch once with `keras_oom.batch_array` (the worker's
    shared memory, so the batch reaches the caller without a copy) and has
    each image decoded and resized straight into its row, `threads` images
    at a time (Pillow, OpenCV and NumPy release the GIL). With `augment`,
    the dataset uses `stack_samples(reader)` instead, for its per-sample
    generators.

    Args:
        reader: The `ImageReader` of one image (its `augment` is not used).
        threads: Images decoded at once in each process, `>= 1`.
    """

    def __init__(self, reader: ImageReader, threads: int = 1) -> None:
        self.reader = reader
        self.threads = threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_pid = -1

    def __getstate__(self) -> dict[str, Any]:
        # The thread pool belongs to the process that made it.
        return {**self.__dict__, "_pool": None, "_pool_pid": -1}

    def __call__(self, paths: Any, rng: np.random.Generator | None = None) -> Any:
        """Reads `paths` into one `(len(paths), *reader.shape)` float32 batch.

        Raises:
            FileReadError: For the first file (in batch order) that cannot
                be read, naming it.
        """
        n = len(paths)
        out = batch_array((n, *self.reader.shape), np.float32)
        if self.threads == 1 or n == 1:
            for k in range(n):
                self._load(paths[k], out[k])
            return out
        pool = self._executor()
        futures = [pool.submit(self._load, paths[k], out[k]) for k in range(n)]
        try:
            for f in futures:
                f.result()
        finally:
            for f in futures:  # after an error, start no more images
                f.cancel()
            concurrent.futures.wait(futures)  # none writes into `out` later
        return out

    def _load(self, path: Any, out: np.ndarray) -> None:
        try:
            self.reader.load_into(path, out)
        except FileReadError:
            raise
        except BaseException as e:
            add_note(e, f"keras_oom: raised while reading the image {str(path)!r}")
            raise

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """This process's thread pool, made at its first batch."""
        pid = os.getpid()
        if self._pool is None or self._pool_pid != pid:  # none, or a fork's copy
            pool = concurrent.futures.ThreadPoolExecutor(
                self.threads, thread_name_prefix="keras_oom-images"
            )
            # Ends with the loader, or at interpreter exit.
            weakref.finalize(self, pool.shutdown, wait=False, cancel_futures=True)
            self._pool, self._pool_pid = pool, pid
        return self._pool
