"""Reading and resizing one image file, as Keras's `format="grain"` path does.

This module runs in worker processes: it imports numpy, Pillow and OpenCV
(the `images` extra), never Keras or a backend.

Keras's `image_dataset_from_directory(format="grain")` opens each file with
Pillow, converts it to the requested channels, casts it to float32 and
resizes it with `keras.ops.image.resize` (on JAX: `jax.image.resize` with
`antialias=False`, i.e. half-pixel centres and an unscaled kernel, weights
renormalised at the borders). `read_image` does the same steps without a
backend:

- decoding: Pillow, with Keras's own mode conversions, so the pixels before
  resizing are identical (OpenCV's decoder was not used: it applies EXIF
  rotation and reads palettes, GIFs and 16-bit files differently);
- `"bilinear"` (the default): OpenCV's `INTER_LINEAR` on the float32 image,
  the same half-pixel triangle filter without antialiasing;
- `"nearest"`: NumPy indexing with JAX's float32 arithmetic for the source
  pixel of each output pixel;
- `"bicubic"`, `"lanczos3"`, `"lanczos5"`: a separable NumPy filter with
  JAX's kernels (Keys cubic with a = -0.5, Lanczos) and border weights;
- `crop_to_aspect_ratio` / `pad_to_aspect_ratio`: JAX's integer arithmetic
  for the crop box and the zero padding.

Measured against Keras 3.15's `format="grain"` output on JAX (JPEG and PNG
files from 37 x 53 to 1024 x 768 pixels resized to 224 x 224, every method
above): mean absolute difference 0.000 and maximum 0.01 on the 0-255
scale (float rounding). Pillow's own `resize` was measured too: it
antialiases when shrinking, which is 0.3 to 5.0 mean and up to 105 maximum
away from Keras's pixels, so it is not used. Per 256 x 256 JPEG on one core:
decoding 0.3 ms; bilinear resize to 224 x 224 with OpenCV 0.05 ms (NumPy's
separable filter: 1.6 ms, bicubic 2.4 ms).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

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
    Image = import_pil()
    try:
        with Image.open(path) as img:
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
    out = arr.astype(np.float32)
    return out[:, :, None] if out.ndim == 2 else out


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


def resize(img: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resizes a float32 `(h, w, c)` image as `keras.ops.image.resize` on JAX.

    Args:
        img: float32 array of shape `(height, width, channels)`.
        size: `(height, width)` of the result.
        interpolation: One of `INTERPOLATIONS`.

    Returns:
        A float32 array of shape `(size[0], size[1], channels)`.
    """
    height, width = img.shape[:2]
    if (height, width) == tuple(size):
        return img
    if interpolation == "nearest":
        out = img
        if height != size[0]:
            out = out[_nearest_index(height, size[0])]
        if width != size[1]:
            out = out[:, _nearest_index(width, size[1])]
        return out
    if interpolation == "bilinear" and img.shape[2] <= 4:
        cv2 = import_cv2()
        out = cv2.resize(
            img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR
        )  # float32 in, float32 out: the same sums as JAX's, in float32
        return out.reshape(size[0], size[1], img.shape[2])
    out = img
    if height != size[0]:
        out = _resize_axis(out, size[0], 0, interpolation)
    if width != size[1]:
        out = _resize_axis(out, size[1], 1, interpolation)
    return out


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

    def load(self, path: Any, rng: np.random.Generator | None) -> Any:
        """Decodes, crops or pads, resizes, lays out and augments one image."""
        if self._pid != os.getpid():
            self._setup_process()
        img = decode(str(path), self.num_channels)
        if self.crop_to_aspect_ratio:
            top, left, h, w = crop_box(img.shape[0], img.shape[1], self.image_size)
            img = img[top : top + h, left : left + w]
        elif self.pad_to_aspect_ratio:
            img = pad_to_aspect(img, self.image_size)
        img = resize(np.ascontiguousarray(img), self.image_size, self.interpolation)
        if self.data_format == "channels_first":
            img = img.transpose(2, 0, 1)
        if self.augment is not None:
            img = self.augment(img, rng if rng is not None else np.random.default_rng())
        return img

    def _setup_process(self) -> None:
        # Import once per process, before the first image. OpenCV's thread
        # settings are left alone: `cv2.setNumThreads` blocks forever in a
        # process forked after its parent ran OpenCV's thread pool.
        self._pid = os.getpid()
        import_pil()
        if self.interpolation == "bilinear":
            import_cv2()


def check_extra() -> None:
    """Raises the ImportError naming the `images` extra if it is missing."""
    import_pil()
    import_cv2()
