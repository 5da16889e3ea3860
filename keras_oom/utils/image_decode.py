"""Decoding one image file to Keras's pixels, before any resizing.

This module runs in worker processes: it imports numpy, Pillow and OpenCV
(the `images` extra, imported on first use, with an ImportError naming the
extra when missing), never Keras or a backend.

Keras's `image_dataset_from_directory(format="grain")` opens each file with
Pillow and converts it to the requested channels. `decode_pixels` gives the
same pixels: JPEG files read as RGB go through OpenCV's `imdecode` where it
is bit-identical to Pillow (`jpeg_rgb`: 8-bit Huffman-coded files of 1 or 3
components, EXIF orientation ignored as Pillow's `open` and TensorFlow
ignore it); everything else (PNG, BMP, GIF, CMYK or 12-bit JPEG, grayscale
and RGBA reads, what OpenCV cannot decode) through Pillow, with Keras's own
mode conversions.

Not used, because they leave Keras's pixels: decoding at reduced scale
(Pillow's `draft`, OpenCV's `IMREAD_REDUCED_COLOR_2/4/8`, identical to each
other), whose DCT scaling averages what Keras's unantialiased resize
samples (on scikit-image's photographs, 512 x 512 to 1411 x 1411 as JPEG,
resized to 224 x 224 and 128 x 128: 1.3 to 4.8 mean and 32 to 152 maximum
away on the 0-255 scale); libjpeg's fast DCT without smooth upsampling
(Pillow's draft mode): 1.3 mean and 57 maximum away on the benchmark's JPEG
files, and no faster.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from keras_oom.utils.file_io import FileReadError

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


def check_extra() -> None:
    """Raises the ImportError naming the `images` extra if it is missing."""
    import_pil()
    import_cv2()
