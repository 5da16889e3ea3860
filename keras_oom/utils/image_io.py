"""Reading and resizing one image file, as Keras's `format="grain"` path does.

This module runs in worker processes: it imports numpy, Pillow and OpenCV
(the `images` extra), never Keras or a backend.

Keras's `image_dataset_from_directory(format="grain")` opens each file with
Pillow, converts it to the requested channels, casts it to float32 and
resizes it with `keras.ops.image.resize` (on JAX: `jax.image.resize` with
`antialias=False`, i.e. half-pixel centres and an unscaled kernel, weights
renormalised at the borders). `ImageReader` does the same steps without a
backend, and `ImageBatchReader` does them straight into a batch's rows:

- decoding: JPEG files read as RGB go through OpenCV's `imdecode` where
  it is bit-identical to Pillow (`jpeg_rgb`: 8-bit Huffman-coded files of
  1 or 3 components, EXIF orientation ignored as Pillow's `open` and
  TensorFlow ignore it); everything else (PNG, BMP, GIF, CMYK or 12-bit
  JPEG, grayscale and RGBA reads, what OpenCV cannot decode) through
  Pillow, with Keras's own mode conversions. Either way the pixels before
  resizing are Keras's exactly;
- `"bilinear"` (the default): OpenCV's `INTER_LINEAR` on the float32 image,
  the same half-pixel triangle filter without antialiasing;
- `"nearest"`: NumPy indexing with JAX's float32 arithmetic for the source
  pixel of each output pixel;
- `"bicubic"`, `"lanczos3"`, `"lanczos5"`: a separable NumPy filter with
  JAX's kernels (Keys cubic with a = -0.5, Lanczos) and border weights;
- `crop_to_aspect_ratio` / `pad_to_aspect_ratio`: JAX's integer arithmetic
  for the crop box and the zero padding, on the decoded integers, then one
  cast to float32.

Measured against Keras 3.15's `format="grain"` output on JAX (JPEG and PNG
files from 37 x 53 to 1024 x 768 pixels resized to 224 x 224, every method
above): mean absolute difference 0.000 and maximum 0.01 on the 0-255
scale (float rounding). Not used, because they leave Keras's pixels:

- Pillow's own `resize`: it antialiases when shrinking, 0.3 to 5.0 mean and
  up to 105 maximum away;
- decoding at reduced scale (Pillow's `draft`, OpenCV's
  `IMREAD_REDUCED_COLOR_2/4/8`, identical to each other): the DCT scaling
  averages what Keras's unantialiased resize samples, so on scikit-image's
  photographs (512 x 512 to 1411 x 1411 as JPEG, resized to 224 x 224 and
  128 x 128) it was 1.3 to 4.8 mean and 32 to 152 maximum away;
- libjpeg's fast DCT without smooth upsampling (Pillow's draft mode): 1.3
  mean and 57 maximum away on the benchmark's JPEG files, and no faster.

CPU time per 256 x 256 JPEG (quality 90, 4:2:0) to 224 x 224, one thread,
medians of 11 interleaved rounds: reading the file 0.011 ms, OpenCV's
decode 0.23 ms (Pillow's, with its conversion to an array: 0.31 ms), the
float32 cast 0.03 ms, OpenCV's bilinear resize 0.07 to 0.09 ms (NumPy's
separable filter: 1.6 ms, bicubic 2.4 ms). The decoder is the limit.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_oom.protocol import add_note
from keras_oom.samples import batch_array
from keras_oom.utils.file_io import FileReadError

#: The interpolations `read_image` reproduces, as keras.ops.image.resize on JAX.
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "lanczos3", "lanczos5")
#: What Keras's function accepts but only its TensorFlow path can do.
TF_ONLY_INTERPOLATIONS = ("area", "gaussian", "mitchellcubic")

_EXTRA_HINT = (
    'install the `images` extra: python -m pip install "keras-oom[images]" '
    "(Pillow and opencv-python-headless)"
)


def import_pil() -> Any:
    """Returns `PIL.Image`, or raises an ImportError naming the extra."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(f"Reading images needs Pillow: {_EXTRA_HINT}.") from e
    return Image


def import_cv2() -> Any:
    """Returns the `cv2` module, or raises an ImportError naming the extra."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError(f"Resizing images needs OpenCV: {_EXTRA_HINT}.") from e
    return cv2


def decode(path: str, num_channels: int) -> np.ndarray:
    """Reads the image file at `path` as Keras's grain path does, before resizing.

    Args:
        path: The file's path.
        num_channels: 1 (grayscale), 3 (RGB) or 4 (RGBA).

    Returns:
        A float32 array of shape `(height, width, num_channels)`, values on
        the file's own scale (0-255 for 8-bit images, up to 65535 for 16-bit
        grayscale PNGs, as Keras keeps them).

    Raises:
        FileReadError: If the file cannot be read or decoded; the message
            names `path`.
    """
    return decode_pixels(path, num_channels).astype(np.float32)


def decode_pixels(path: str, num_channels: int) -> np.ndarray:
    """As `decode`, in the file's own dtype: `(height, width, num_channels)`.

    uint8 for 8-bit images; uint16 or int32 for 16- and 32-bit grayscale
    (as Pillow gives them). An RGB read of a JPEG that OpenCV and Pillow
    decode alike (`jpeg_rgb`) goes through OpenCV; everything else through
    Pillow, with Keras's mode conversions.

    Raises:
        FileReadError: If the file cannot be read or decoded; the message
            names `path`.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FileReadError(path, f"cannot read the file: {e}") from e
    if num_channels == 3:
        img = jpeg_rgb(data)
        if img is not None:
            return img
    Image = import_pil()
    try:
        with Image.open(io.BytesIO(data)) as img:
            if num_channels == 1:
                # Keras keeps 16- and 32-bit grayscale as they are.
                if img.mode not in ("L", "I;16", "I"):
                    img = img.convert("L")
            elif num_channels == 4:
                if img.mode != "RGBA":
                    img = img.convert("RGBA")
            elif img.mode != "RGB":
                img = img.convert("RGB")
            arr = np.asarray(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FileReadError(path, f"cannot decode the image: {e}") from e
    return arr[:, :, None] if arr.ndim == 2 else arr


def jpeg_frame(data: bytes) -> tuple[int, int, int, int, int] | None:
    """A JPEG's frame header: `(marker, precision, height, width, components)`.

    Walks the marker segments from the start of the file to the first
    start-of-frame marker (SOF0 to SOF15). Returns None for what is not a
    JPEG file, or has no frame header in `data`.
    """
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 10 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return marker, data[i + 4], height, width, data[i + 9]
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


# Baseline, extended and progressive Huffman-coded frames: what libjpeg-turbo
# decodes the same way inside OpenCV and Pillow.
_SAME_IN_OPENCV = (0xC0, 0xC1, 0xC2)


def jpeg_rgb(data: bytes) -> np.ndarray | None:
    """Decodes a JPEG file's bytes to RGB uint8 with OpenCV, as Pillow would.

    OpenCV and Pillow both decode JPEG with libjpeg-turbo (accurate integer
    DCT, smooth chroma upsampling): for 8-bit Huffman-coded files of 1 or 3
    components (YCbCr, Adobe RGB or grayscale, which both repeat into the
    three channels) the pixels are identical, and OpenCV is faster (no
    Python-level header parsing, no repacking of the pixels). EXIF
    orientation is ignored, as Pillow's `open` and TensorFlow's decoder do.

    Returns:
        A uint8 array `(height, width, 3)`, or None for what this path does
        not take (another format, CMYK, 12-bit, arithmetic coding, an image
        over Pillow's `MAX_IMAGE_PIXELS`) or what OpenCV cannot decode (a
        truncated or corrupt file): Pillow then decodes it, or raises.
    """
    frame = jpeg_frame(data)
    if frame is None:
        return None
    marker, precision, height, width, components = frame
    if marker not in _SAME_IN_OPENCV or precision != 8 or components not in (1, 3):
        return None
    limit = import_pil().MAX_IMAGE_PIXELS
    if limit is not None and height * width > limit:
        return None  # Pillow warns or refuses: as Keras
    cv2 = import_cv2()
    rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.11
    flags = (cv2.IMREAD_COLOR if rgb is None else rgb) | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None or img.shape != (height, width, 3):
        return None
    return img if rgb is not None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def crop_box(height: int, width: int, size: tuple[int, int]) -> tuple[int, ...]:
    """Keras's centred crop to the target aspect ratio: `(top, left, h, w)`."""
    target_height, target_width = size
    crop_height = int(float(width * target_height) / target_width)
    crop_height = max(min(height, crop_height), 1)
    crop_width = int(float(height * target_width) / target_height)
    crop_width = max(min(width, crop_width), 1)
    top = int(float(height - crop_height) / 2)
    left = int(float(width - crop_width) / 2)
    return top, left, crop_height, crop_width


def pad_to_aspect(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Keras's zero padding to the target aspect ratio, on `(h, w, c)`.

    As `keras.ops.image.resize(pad_to_aspect_ratio=True)`: the same number
    of zero rows (or columns) on both sides, rounded down.
    """
    height, width = img.shape[:2]
    target_height, target_width = size
    pad_height = max(height, int(float(width * target_height) / target_width))
    pad_width = max(width, int(float(height * target_width) / target_height))
    top = int(float(pad_height - height) / 2)
    left = int(float(pad_width - width) / 2)
    if top > 0:
        left = 0
    elif left <= 0:
        return img
    out = np.zeros((height + 2 * top, width + 2 * left, img.shape[2]), dtype=img.dtype)
    out[top : top + height, left : left + width] = img
    return out


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    out = ((1.5 * x - 2.5) * x) * x + 1.0
    out = np.where(x >= 1.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, out)
    return np.where(x >= 2.0, 0.0, out)


def _lanczos(radius: float) -> Callable[[np.ndarray], np.ndarray]:
    def kernel(x: np.ndarray) -> np.ndarray:
        y = radius * np.sin(np.pi * x) * np.sin(np.pi * x / radius)
        safe = np.where(x != 0, np.pi**2 * x**2, 1.0)
        out = np.where(x > 1e-3, y / safe, 1.0)
        return np.where(x > radius, 0.0, out)

    return kernel


# name: (radius in input pixels, kernel of |distance|)
_KERNELS: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    "bilinear": (1, lambda x: np.maximum(0.0, 1.0 - x)),
    "bicubic": (2, _keys_cubic),
    "lanczos3": (3, _lanczos(3.0)),
    "lanczos5": (5, _lanczos(5.0)),
}


def _taps(n_in: int, n_out: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, `(n_out, taps)` each, as jax.image.resize.

    Half-pixel centres, the kernel unscaled (no antialiasing), weights of
    taps outside the image dropped and the rest renormalised.
    """
    radius, kernel = _KERNELS[method]
    sample = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    first = np.floor(sample).astype(np.int64) - radius + 1
    idx = first[:, None] + np.arange(2 * radius)[None, :]
    w = kernel(np.abs(sample[:, None] - idx))
    w = np.where((idx >= 0) & (idx < n_in), w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    ok = np.abs(total) > 1000.0 * float(np.finfo(np.float32).eps)
    w = np.where(ok, w / np.where(total != 0, total, 1.0), 0.0)
    return np.clip(idx, 0, n_in - 1), w.astype(np.float32)


def _resize_axis(img: np.ndarray, n_out: int, axis: int, method: str) -> np.ndarray:
    idx, w = _taps(img.shape[axis], n_out, method)
    shape = [1, 1, 1]
    shape[axis] = n_out
    out = np.zeros(
        img.shape[:axis] + (n_out,) + img.shape[axis + 1 :], dtype=np.float32
    )
    for t in range(idx.shape[1]):
        out += w[:, t].reshape(shape) * np.take(img, idx[:, t], axis=axis)
    return out


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    # jax.image.resize computes these in float32; so do we, for the same ties.
    pos = (
        (np.arange(n_out, dtype=np.float32) + np.float32(0.5))
        * np.float32(n_in)
        / np.float32(n_out)
    )
    return np.floor(pos.astype(np.float32)).astype(np.intp)


def resize(
    img: np.ndarray,
    size: tuple[int, int],
    interpolation: str,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Resizes a float32 `(h, w, c)` image as `keras.ops.image.resize` on JAX.

    Args:
        img: float32 array of shape `(height, width, channels)`.
        size: `(height, width)` of the result.
        interpolation: One of `INTERPOLATIONS`.
        out: Optional float32 C-contiguous array of the result's shape to
            write the result into (a row of a batch).

    Returns:
        A float32 array of shape `(size[0], size[1], channels)`: `out` if
        given.
    """
    result = _resize(img, size, interpolation, out)
    if out is None or result is out:
        return result
    out[...] = result
    return out


def _resize(
    img: np.ndarray, size: tuple[int, int], interpolation: str, out: Any
) -> np.ndarray:
    height, width = img.shape[:2]
    if (height, width) == tuple(size):
        return img
    if interpolation == "nearest":
        result = img
        if height != size[0]:
            result = result[_nearest_index(height, size[0])]
        if width != size[1]:
            result = result[:, _nearest_index(width, size[1])]
        return result
    if interpolation == "bilinear" and img.shape[2] <= 4:
        cv2 = import_cv2()
        shape = (size[0], size[1], img.shape[2])
        if out is not None and img.shape[2] > 1:
            # Into `out` itself; OpenCV allocates anew if it does not fit.
            dst = cv2.resize(
                img, (size[1], size[0]), dst=out, interpolation=cv2.INTER_LINEAR
            )
            return out if dst is out else dst.reshape(shape)
        result = cv2.resize(
            img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR
        )  # float32 in, float32 out: the same sums as JAX's, in float32
        return result.reshape(shape)
    result = img
    if height != size[0]:
        result = _resize_axis(result, size[0], 0, interpolation)
    if width != size[1]:
        result = _resize_axis(result, size[1], 1, interpolation)
    return result


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

    def __init__(
        self,
        image_size: tuple[int, int],
        num_channels: int,
        interpolation: str,
        data_format: str,
        crop_to_aspect_ratio: bool = False,
        pad_to_aspect_ratio: bool = False,
        augment: Callable[[np.ndarray, np.random.Generator], Any] | None = None,
    ) -> None:
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.num_channels = num_channels
        self.interpolation = interpolation
        self.data_format = data_format
        self.crop_to_aspect_ratio = crop_to_aspect_ratio
        self.pad_to_aspect_ratio = pad_to_aspect_ratio
        self.augment = augment
        self._pid = -1

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


def check_extra() -> None:
    """Raises the ImportError naming the `images` extra if it is missing."""
    import_pil()
    import_cv2()
