"""What the `*_dataset_from_directory` functions share: files, labels, datasets.

The walk, the allow-listed extensions, the seeded global shuffle and the
validation split are Keras's own (`keras.src.utils.dataset_utils`, which
imports no TensorFlow for local folders): `index_files` calls them, so the
file paths, labels, class names and the training / validation membership
are Keras's by construction. This module then builds the keras-oom dataset
over the files: a `LoaderDataset` for `num_workers=0`, a
`PrefetchLoaderDataset` otherwise, both with Keras's `class_names` and
`file_paths` attributes.

Runs in the caller's process only (it imports Keras); what workers run is in
`image_readers.py` and `file_io.py`.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from keras_oom.checks import as_index
from keras_oom.dataset import LoaderDataset
from keras_oom.prefetch import PrefetchLoaderDataset
from keras_oom.utils.file_io import Unbatched

LABEL_MODES = ("int", "categorical", "binary", None)
#: The parameters every `*_dataset_from_directory` function forwards to
#: `from_directory` as they are, by name (`dataset_kwargs`: its `**` part).
FORWARDED = (
    "directory",
    "labels",
    "label_mode",
    "class_names",
    "batch_size",
    "shuffle",
    "seed",
    "validation_split",
    "subset",
    "follow_links",
    "verbose",
    "num_workers",
    "dataset_kwargs",
)

#: What both dataset classes hold beyond their base class, as Keras's datasets.
_FILE_ATTRIBUTES = """Attributes:
    class_names: The class names, in label order, or `None` without
        labels (as Keras's dataset's `class_names`).
    file_paths: The dataset's files, in Keras's order (as Keras's
        dataset's `file_paths`).
"""

_Class = TypeVar("_Class", bound=type)


def _with_file_attributes(cls: _Class) -> _Class:
    """Ends `cls`'s docstring with `_FILE_ATTRIBUTES`, written once for both."""
    if cls.__doc__ is not None:  # None under `python -OO`
        cls.__doc__ = inspect.cleandoc(cls.__doc__) + "\n\n" + _FILE_ATTRIBUTES
    return cls


@_with_file_attributes
class FileDataset(LoaderDataset):
    """A `LoaderDataset` over files, with Keras's `class_names` and `file_paths`.

    What `num_workers=0` returns: each batch is loaded in the caller's
    process when it is read. It has no workers, but takes `with` and
    `close()` as `PrefetchFileDataset` does, so code written for one runs
    with the other.
    """

    class_names: list[str] | None
    file_paths: list[str]

    def close(self) -> None:
        """Does nothing: there are no workers to end."""

    def __enter__(self) -> FileDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@_with_file_attributes
class PrefetchFileDataset(PrefetchLoaderDataset):
    """A `PrefetchLoaderDataset` over files, with `class_names` and `file_paths`.

    What `num_workers >= 1` (or `None`) returns: batches load ahead in worker
    processes. Close it (`with`, or `close()`) to end the workers.
    """

    class_names: list[str] | None
    file_paths: list[str]


def default_num_workers() -> int:
    """One worker per core this process may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores)


def check_num_workers(num_workers: Any) -> int | None:
    """Validates `num_workers`: `None` or an integer `>= 0`."""
    return _optional_index(num_workers, "num_workers", 0, "None or an integer >= 0")


def check_label_mode(label_mode: Any) -> None:
    """Keras's check of `label_mode`, with Keras's message."""
    if label_mode not in LABEL_MODES:
        raise ValueError(
            '`label_mode` argument must be one of "int", '
            '"categorical", "binary", '
            f"or None. Received: label_mode={label_mode}"
        )


def check_labels(
    labels: Any, class_names: Any, kind: str, samples: str, opening: str = ""
) -> None:
    """Keras's checks of `labels` and `class_names`, with Keras's messages.

    `kind`, `samples` and `opening` complete them: "{opening}`labels`
    argument ... the number of {kind} files ... a dataset that only
    contains {samples}".
    """
    if labels not in ("inferred", None):
        if not isinstance(labels, (list, tuple)):
            raise ValueError(
                f"{opening}`labels` argument should be a list/tuple of integer "
                "labels, "
                f"of the same size as the number of {kind} files in the target "
                "directory. If you wish to infer the labels from the "
                "subdirectory "
                'names in the target directory, pass `labels="inferred"`. '
                f"If you wish to get a dataset that only contains {samples} "
                f"(no labels), pass `labels=None`. Received: labels={labels}"
            )
        if class_names:
            raise ValueError(
                "You can only pass `class_names` if "
                f'`labels="inferred"`. Received: labels={labels}, and '
                f"class_names={class_names}"
            )


def check_batch_size(batch_size: Any) -> None:
    """`batch_size` must be None or a positive integer."""
    _optional_index(batch_size, "batch_size", 1, "None or a positive integer")


def _optional_index(value: Any, name: str, minimum: int, what: str) -> int | None:
    """`None`, or `checks.as_index`: a TypeError or ValueError naming `name`."""
    return None if value is None else as_index(value, name, minimum=minimum, what=what)


def index_files(
    directory: Any,
    labels: Any,
    formats: tuple[str, ...],
    class_names: Sequence[str] | None,
    shuffle: bool,
    seed: int,
    follow_links: bool,
    verbose: bool,
) -> tuple[list[str], Any, list[str] | None]:
    """Keras's `index_directory`: `(file_paths, labels, class_names)`.

    `labels` given as a list is copied first (Keras shuffles it in place).
    """
    from keras.src.utils import dataset_utils

    if isinstance(labels, (list, tuple)):
        labels = list(labels)
    return dataset_utils.index_directory(
        os.fspath(directory),
        labels,
        formats=formats,
        class_names=list(class_names) if class_names is not None else None,
        shuffle=shuffle,
        seed=seed,
        follow_links=follow_links,
        verbose=verbose,
    )


def check_split(validation_split: Any, subset: Any, shuffle: bool, seed: Any) -> None:
    """Keras's `check_validation_split_arg`, with Keras's messages."""
    from keras.src.utils import dataset_utils

    dataset_utils.check_validation_split_arg(validation_split, subset, shuffle, seed)


def split(
    paths: list[str], labels: Any, validation_split: Any, subset: str | None
) -> tuple[list[str], Any]:
    """Keras's `get_training_or_validation_split`."""
    from keras.src.utils import dataset_utils

    return dataset_utils.get_training_or_validation_split(
        paths, labels, validation_split, subset
    )


def encode_labels(labels: Any, label_mode: str | None, num_classes: int) -> Any:
    """Labels as Keras's datasets yield them, one row per file.

    `"int"`: int32 `(n,)`; `"categorical"`: float32 one-hot `(n, num_classes)`
    (a label outside `range(num_classes)` is all zeros, as
    `keras.ops.one_hot`); `"binary"`: float32 `(n, 1)`; `None`: no labels.
    """
    if label_mode is None or labels is None:
        return None
    values = np.asarray(labels)
    if label_mode == "binary":
        return values.astype(np.float32).reshape(-1, 1)
    if label_mode == "categorical":
        classes = np.arange(num_classes)
        return (values.astype(np.int64)[:, None] == classes[None, :]).astype(np.float32)
    return values.astype(np.int32)


def make_dataset(
    loader: Callable[..., Any],
    paths: list[str],
    labels: Any,
    *,
    class_names: list[str] | None,
    batch_size: int | None,
    shuffle: bool,
    seed: int,
    num_workers: int | None,
    dataset_kwargs: dict[str, Any],
) -> FileDataset | PrefetchFileDataset:
    """The dataset over `paths`: files are its sample ids.

    Args:
        loader: A batch loader, `loader(paths, rng)`.
        paths: The files, in Keras's order.
        labels: Encoded labels aligned with `paths` (`encode_labels`), or
            `None`.
        class_names: For the `class_names` attribute.
        batch_size: Files per batch, or `None` for single samples.
        shuffle: Whether every epoch reads the files in an order of its own.
        seed: The shuffle's seed.
        num_workers: `0` for a `FileDataset`, `None` (one per core, at most
            one per batch) or `>= 1` for a `PrefetchFileDataset`.
        dataset_kwargs: Further arguments of the dataset class.
    """
    ids = np.asarray(paths, dtype=object)
    if batch_size is None:
        # One sample per read, labels paired by the loader (Keras's
        # unbatched dataset yields labels without a batch axis).
        by_path = None if labels is None else dict(zip(paths, labels, strict=True))
        loader = Unbatched(loader, by_path)
        labels, batch_size = None, 1
    common: dict[str, Any] = dict(batch_size=batch_size, shuffle=shuffle, seed=seed)
    if isinstance(loader, Unbatched):
        # A single sample has no batch axis: there is no row per id to check.
        common["rows_per_id"] = None
    ds: FileDataset | PrefetchFileDataset
    if num_workers == 0:
        ds = FileDataset(loader, ids, labels, **common, **dataset_kwargs)
    elif num_workers is None:
        with warnings.catch_warnings():
            # The default is one per core: fewer batches than cores is fine.
            warnings.filterwarnings("ignore", "num_workers reduced", UserWarning)
            ds = PrefetchFileDataset(
                loader,
                ids,
                labels,
                num_workers=default_num_workers(),
                **common,
                **dataset_kwargs,
            )
    else:
        ds = PrefetchFileDataset(
            loader, ids, labels, num_workers=num_workers, **common, **dataset_kwargs
        )
    ds.class_names = class_names
    ds.file_paths = list(paths)
    return ds


def from_directory(
    directory: Any,
    labels: Any,
    label_mode: str | None,
    class_names: Sequence[str] | None,
    *,
    formats: tuple[str, ...],
    batch_size: int | None,
    shuffle: bool,
    seed: int | None,
    validation_split: float | None,
    subset: str | None,
    follow_links: bool,
    verbose: bool,
    num_workers: int | None,
    dataset_kwargs: dict[str, Any],
    make_loader: Callable[[], Callable[..., Any]],
    noun: str,
    allowed: str,
) -> Any:
    """Keras's flow after the argument checks, ending in keras-oom datasets.

    Draws `seed` if `None`, indexes the files (`index_files`), checks
    `"binary"`, splits, and builds one dataset (or `[training,
    validation]` with `subset="both"`, the validation set unshuffled as in
    Keras) with `make_dataset`. `noun` and `allowed` complete Keras's
    messages: "No {noun} found in directory {directory}. {allowed}".
    """
    if seed is None:
        seed = int(np.random.randint(1_000_000))
    paths, labels, class_names = index_files(
        directory,
        labels,
        formats,
        class_names=class_names,
        shuffle=shuffle,
        seed=seed,
        follow_links=follow_links,
        verbose=verbose,
    )
    if label_mode == "binary" and len(class_names or ()) != 2:
        raise ValueError(
            'When passing `label_mode="binary"`, there must be exactly 2 '
            f"class_names. Received: class_names={class_names}"
        )
    num_classes = len(class_names) if class_names else 0

    def build(part_paths: list[str], part_labels: Any, part_shuffle: bool) -> Any:
        return make_dataset(
            make_loader(),
            part_paths,
            encode_labels(part_labels, label_mode, num_classes),
            class_names=class_names,
            batch_size=batch_size,
            shuffle=part_shuffle,
            seed=seed,
            num_workers=num_workers,
            dataset_kwargs=dataset_kwargs,
        )

    if subset == "both":
        train = split(paths, labels, validation_split, "training")
        val = split(paths, labels, validation_split, "validation")
        if not train[0]:
            raise ValueError(
                f"No training {noun} found in directory {directory}. {allowed}"
            )
        if not val[0]:
            raise ValueError(
                f"No validation {noun} found in directory {directory}. {allowed}"
            )
        return [build(*train, shuffle), build(*val, False)]
    paths, labels = split(paths, labels, validation_split, subset)
    if not paths:
        raise ValueError(f"No {noun} found in directory {directory}. {allowed}")
    return build(paths, labels, shuffle)


def forward(
    arguments: Mapping[str, Any],
    *,
    formats: tuple[str, ...],
    make_loader: Callable[[], Callable[..., Any]],
    noun: str,
    allowed: str,
) -> Any:
    """`from_directory` called with a public function's own arguments.

    The one place where the `*_dataset_from_directory` functions hand their
    shared parameters on, so that they are forwarded alike.

    Args:
        arguments: The calling function's `locals()` after its checks: the
            names in `FORWARDED`, with the values they hold then (`labels`
            and `label_mode` made `None` together, `num_workers` checked).
        formats: The allow-listed extensions, as Keras's.
        make_loader: Makes the batch loader of one dataset.
        noun: What the files are, for Keras's "No {noun} found" message.
        allowed: The end of that message, as Keras's.

    Raises:
        KeyError: If `arguments` lacks one of `FORWARDED` (a bug of the
            caller, never of the user).
    """
    return from_directory(
        **{name: arguments[name] for name in FORWARDED},
        formats=formats,
        make_loader=make_loader,
        noun=noun,
        allowed=allowed,
    )
