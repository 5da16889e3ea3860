"""Cropping, padding and resizing a decoded image as `keras.ops.image.resize` on JAX.

This module runs in worker processes: it imports numpy and OpenCV (for
`"bilinear"`), never Keras or a backend.

Keras's `format="grain"` path casts each image to float32 and resizes it
with `keras.ops.image.resize` (on JAX: `jax.image.resize` with
`antialias=False`, i.e. half-pixel centres and an unscaled kernel, weights
renormalised at the borders). Here:

- `"bilinear"` (the default): OpenCV's `INTER_LINEAR` on the float32 image,
  the same half-pixel triangle filter without antialiasing;
- `"nearest"`: NumPy indexing with JAX's float32 arithmetic for the source
  pixel of each output pixel;
- `"bicubic"`, `"lanczos3"`, `"lanczos5"`: a separable NumPy filter with
  JAX's kernels (Keys cubic with a = -0.5, Lanczos) and border weights;
- `crop_to_aspect_ratio` / `pad_to_aspect_ratio` (`crop_box`,
  `pad_to_aspect`): JAX's integer arithmetic for the crop box and the zero
  padding, on the decoded integers, before the one cast to float32.

Not used: Pillow's own `resize`, which antialiases when shrinking (0.3 to
5.0 mean and up to 105 maximum away on the 0-255 scale), and OpenCV's
bicubic, another kernel (up to 16 away).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from keras_oom.utils.image_decode import import_cv2

#: The interpolations `resize` reproduces, as keras.ops.image.resize on JAX.
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "lanczos3", "lanczos5")
#: What Keras's function accepts but only its TensorFlow path can do.
TF_ONLY_INTERPOLATIONS = ("area", "gaussian", "mitchellcubic")


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
