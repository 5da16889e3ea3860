"""`image_dataset_from_directory`: Keras's function, on the pool, without TensorFlow."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from keras_oom.samples import stack_samples
from keras_oom.utils import directory as folder
from keras_oom.utils.directory import FileDataset, PrefetchFileDataset
from keras_oom.utils.image_decode import check_extra
from keras_oom.utils.image_readers import ImageBatchReader, ImageReader
from keras_oom.utils.image_resize import INTERPOLATIONS, TF_ONLY_INTERPOLATIONS

#: Keras's allow-listed image extensions (keras.src.utils.image_dataset_utils).
ALLOWLIST_FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# In Keras's order, for Keras's message.
_KERAS_INTERPOLATIONS = (
    "bilinear",
    "nearest",
    "bicubic",
    "area",
    "lanczos3",
    "lanczos5",
    "gaussian",
    "mitchellcubic",
)
_CHANNELS = {"grayscale": 1, "rgb": 3, "rgba": 4}
# Samples decoded at once in each process: Pillow and OpenCV release the GIL,
# so a second thread keeps a worker's core busy while the other runs Python
# (measured on the shared 2-core machine, 2 workers, 256 x 256 JPEGs to
# 224 x 224: faster than one thread in every run, by 1.1x to 2x; again with
# ImageBatchReader: 2,456 against 1,981 images/s, medians of 5, same run).
_THREADS = 2


def image_dataset_from_directory(
    directory: Any,
    labels: Any = "inferred",
    label_mode: str | None = "int",
    class_names: Sequence[str] | None = None,
    color_mode: str = "rgb",
    batch_size: int | None = 32,
    image_size: int | Sequence[int] = (256, 256),
    shuffle: bool = True,
    seed: int | None = None,
    validation_split: float | None = None,
    subset: str | None = None,
    interpolation: str = "bilinear",
    follow_links: bool = False,
    crop_to_aspect_ratio: bool = False,
    pad_to_aspect_ratio: bool = False,
    data_format: str | None = None,
    verbose: bool = True,
    *,
    num_workers: int | None = None,
    augment: Callable[[np.ndarray, np.random.Generator], Any] | None = None,
    **dataset_kwargs: Any,
) -> FileDataset | PrefetchFileDataset | list[Any]:
    """Generates a dataset from image files in a directory, as Keras does.

    Takes the parameters, defaults and semantics of
    `keras.utils.image_dataset_from_directory` and returns a keras-oom
    dataset: migrating is changing the import. The files, labels, class
    names and training / validation split are Keras's own (computed by
    Keras's `index_directory`), and the images are Keras's
    `format="grain"` images: decoded as Pillow decodes them, with Keras's
    conversions,
    resized as `keras.ops.image.resize` does (no antialiasing, half-pixel
    centres), float32. Neither TensorFlow nor Grain is needed, and the
    workers import neither Keras nor a backend.

    With a directory laid out as

    ```
    main_directory/
    ...class_a/
    ......a_image_1.jpg
    ......a_image_2.jpg
    ...class_b/
    ......b_image_1.jpg
    ......b_image_2.jpg
    ```

    `image_dataset_from_directory(main_directory)` yields batches of images
    from `class_a` and `class_b` with labels 0 and 1.

    Supported image formats: `.jpeg`, `.jpg`, `.png`, `.bmp`, `.gif`
    (animated GIFs are truncated to their first frame).

    JPEG files read as RGB are decoded with OpenCV where its pixels are
    Pillow's to the bit (8-bit files of 1 or 3 components; EXIF orientation
    ignored, as Keras ignores it), other files with Pillow; images are
    resized with OpenCV (bilinear) or NumPy (the other methods),
    reproducing JAX's resize arithmetic: against
    Keras 3.15's `format="grain"` output on JAX, measured on JPEG and PNG
    files from 37 x 53 to 1024 x 768 pixels for every supported
    `interpolation`, crop and pad, the mean absolute difference is 0.000 and
    the maximum 0.01 on the 0-255 scale. Pillow's own `resize` antialiases
    when it shrinks (up to 105 away), OpenCV's bicubic uses another kernel
    (up to 16 away), and decoding at reduced scale (Pillow's `draft`)
    averages what Keras samples (up to 152 away on photographs), so none
    is used. Needs the `images` extra (`pip install "keras-oom[images]"`).

    Args:
        directory: Directory where the data is located. If `labels` is
            `"inferred"`, it should contain subdirectories, each containing
            images for a class; otherwise the structure is ignored.
        labels: `"inferred"` (labels from the subdirectory names), `None`
            (no labels), or a list/tuple of integer labels, one per image
            file, in the alphanumeric order of the file paths.
        label_mode: `"int"` (int32 labels, shape `(batch_size,)`),
            `"categorical"` (float32 one-hot, `(batch_size, num_classes)`),
            `"binary"` (float32 0 or 1, `(batch_size, 1)`, exactly 2
            classes), or `None` (no labels).
        class_names: Only with `labels="inferred"`: the explicit list of
            class names (subdirectory names), in label order.
        color_mode: `"grayscale"`, `"rgb"` or `"rgba"`: 1, 3 or 4 channels.
        batch_size: Images per batch, or `None` for single images.
        image_size: `(height, width)` of every image, or one int for both.
        shuffle: Whether to shuffle. The files are shuffled once with
            `seed` (Keras's global shuffle, which also decides the split),
            and the training images anew in every epoch, in an order that
            is a pure function of `seed` and the epoch. `False` keeps the
            alphanumeric order.
        seed: Seed of the shuffles; `None` draws one.
        validation_split: Optional fraction in (0, 1) of the files kept for
            validation (the last ones of the shuffled list).
        subset: `"training"`, `"validation"` or `"both"` (returns
            `[training, validation]`); only with `validation_split`.
        interpolation: `"bilinear"`, `"nearest"`, `"bicubic"`,
            `"lanczos3"` or `"lanczos5"`. Keras's TensorFlow-only methods
            (`"area"`, `"gaussian"`, `"mitchellcubic"`) raise a ValueError.
        follow_links: Whether to visit subdirectories behind symlinks.
        crop_to_aspect_ratio: Resize without distortion by cropping the
            largest centred window of the target aspect ratio first.
        pad_to_aspect_ratio: Resize without distortion by padding with
            zeros to the target aspect ratio first.
        data_format: `"channels_last"`, `"channels_first"`, or `None` for
            `keras.config.image_data_format()`.
        verbose: Whether to print the number of files and classes found.
        num_workers: Worker processes that load batches ahead: `None` (the
            default) starts one per core; `0` returns a plain
            `LoaderDataset` (a `FileDataset`) that loads in the caller's
            process.
        augment: Optional `augment(image, rng) -> image`, applied to every
            image after resizing (a float32 array in `data_format`'s layout)
            with its own `numpy.random.Generator`, a pure function of
            `seed`, the epoch and the image's place in it: the same
            augmentation whatever `num_workers`. It runs in the workers, so
            it must pickle (cloudpickle) unless workers are forked, and
            import no backend. Every result must have one shape and dtype.
        **dataset_kwargs: Further arguments of the dataset:
            `drop_remainder`, `repeat`, `shard`, `shard_mode`, and with
            workers `timeout`, `start_method`, `worker_init`.

    Returns:
        A `PrefetchFileDataset` (a `PrefetchLoaderDataset`), or a
        `FileDataset` (a `LoaderDataset`) with `num_workers=0`; a list of
        two with `subset="both"`. It has Keras's `class_names` and
        `file_paths` attributes. Each item is `(images, labels)`, or
        `images` alone without labels: images float32 of shape
        `(batch_size, height, width, channels)` (channels first with
        `"channels_first"`), labels as `label_mode` says. Close a dataset
        with workers (`with`, or `close()`) when done.

    Raises:
        ValueError: For what Keras rejects, with Keras's messages: a bad
            `labels`, `label_mode`, `color_mode`, `image_size`,
            `interpolation`, `validation_split` / `subset` / `seed`
            combination, `class_names` that are not subdirectories, both
            `crop_to_aspect_ratio` and `pad_to_aspect_ratio`, `"binary"`
            without exactly 2 classes, or no images found; and for a
            negative `num_workers`.
        FileNotFoundError: If `directory` does not exist (as Keras).
        TypeError: If `augment` is not callable or `num_workers` or
            `batch_size` is not an integer.
        ImportError: If Pillow or OpenCV (the `images` extra) is missing.

    Reading a batch raises `keras_oom.utils.FileReadError`, naming the file,
    for an image that cannot be decoded (corrupt or truncated).

    Example:

    ```python
    >>> import os, tempfile
    >>> import numpy as np
    >>> from PIL import Image
    >>> from keras_oom import image_dataset_from_directory
    >>> root = tempfile.mkdtemp()
    >>> for label in ("cats", "dogs"):
    ...     os.mkdir(os.path.join(root, label))
    ...     for i in range(3):
    ...         Image.fromarray(np.full((40, 30, 3), 50 * i, np.uint8)).save(
    ...             os.path.join(root, label, f"{i}.png"))
    >>> ds = image_dataset_from_directory(root, image_size=(32, 32),
    ...                                   batch_size=4, seed=0, num_workers=0,
    ...                                   verbose=False)
    >>> ds.class_names
    ['cats', 'dogs']
    >>> x, y = ds[0]
    >>> x.shape, x.dtype, y.dtype
    ((4, 32, 32, 3), dtype('float32'), dtype('int32'))

    ```
    """
    from keras.src.backend.config import standardize_data_format

    folder.check_labels(labels, class_names, "image", "images")
    folder.check_label_mode(label_mode)
    if labels is None or label_mode is None:
        labels, label_mode = None, None
    if color_mode not in _CHANNELS:
        raise ValueError(
            '`color_mode` must be one of {"rgb", "rgba", "grayscale"}. '
            f"Received: color_mode={color_mode}"
        )
    size = _check_image_size(image_size)
    interpolation = _check_interpolation(interpolation)
    if crop_to_aspect_ratio and pad_to_aspect_ratio:
        raise ValueError(
            "Only one of `pad_to_aspect_ratio`, `crop_to_aspect_ratio`"
            " can be set to `True`."
        )
    folder.check_split(validation_split, subset, shuffle, seed)
    folder.check_batch_size(batch_size)
    num_workers = folder.check_num_workers(num_workers)
    if augment is not None and not callable(augment):
        raise TypeError(
            "`augment` must be callable, as augment(image, rng) -> image. "
            f"Received: augment={augment!r}"
        )
    check_extra()

    reader = ImageReader(
        size,
        _CHANNELS[color_mode],
        interpolation,
        standardize_data_format(data_format=data_format),
        crop_to_aspect_ratio=bool(crop_to_aspect_ratio),
        pad_to_aspect_ratio=bool(pad_to_aspect_ratio),
        augment=augment,
    )
    return folder.forward(
        locals(),  # the checked arguments, by name: folder.FORWARDED
        formats=ALLOWLIST_FORMATS,
        # Without augment, each image is decoded straight into its row of
        # the batch; with it, stack_samples gives each image its generator.
        make_loader=lambda: (
            ImageBatchReader(reader, threads=_THREADS)
            if augment is None
            else stack_samples(reader, threads=_THREADS)
        ),
        noun="images",
        allowed=f"Allowed formats: {ALLOWLIST_FORMATS}",
    )


def _check_image_size(image_size: Any) -> tuple[int, int]:
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    elif not isinstance(image_size, (list, tuple)) or len(image_size) != 2:
        raise ValueError(
            "Invalid `image_size` value. Expected a tuple of 2 integers. "
            f"Received: image_size={image_size}"
        )
    if not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
        for s in image_size
    ):
        raise ValueError(
            "Invalid `image_size` value. Expected a tuple of 2 positive "
            f"integers. Received: image_size={image_size}"
        )
    return int(image_size[0]), int(image_size[1])


def _check_interpolation(interpolation: Any) -> str:
    name = str(interpolation).lower()
    if name not in _KERAS_INTERPOLATIONS:
        raise ValueError(
            "Argument `interpolation` should be one of "
            f"{_KERAS_INTERPOLATIONS}. "
            f"Received: interpolation={interpolation}"
        )
    if name in TF_ONLY_INTERPOLATIONS:
        raise ValueError(
            f"`interpolation={interpolation!r}` exists only in Keras's "
            'TensorFlow path (format="tf"); keras-oom resizes as '
            '`format="grain"` does (keras.ops.image.resize), with one of '
            f"{INTERPOLATIONS}. Received: interpolation={interpolation}"
        )
    return name
