"""`text_dataset_from_directory`: Keras's function, on the pool, without TensorFlow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras_oom.utils import directory as folder
from keras_oom.utils.directory import FileDataset, PrefetchFileDataset
from keras_oom.utils.file_io import TextLoader


def text_dataset_from_directory(
    directory: Any,
    labels: Any = "inferred",
    label_mode: str | None = "int",
    class_names: Sequence[str] | None = None,
    batch_size: int | None = 32,
    max_length: int | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    validation_split: float | None = None,
    subset: str | None = None,
    follow_links: bool = False,
    verbose: bool = True,
    *,
    num_workers: int | None = None,
    **dataset_kwargs: Any,
) -> FileDataset | PrefetchFileDataset | list[Any]:
    """Generates a dataset from text files in a directory, as Keras does.

    Takes the parameters, defaults and semantics of
    `keras.utils.text_dataset_from_directory` and returns a keras-oom
    dataset. The files (`.txt`), labels, class names and split are Keras's
    own (Keras's `index_directory`), and the strings are those of Keras's
    `format="grain"` path: each file read in text mode and cut to its first
    `max_length` characters. Neither TensorFlow nor Grain is needed.

    With a directory laid out as `main_directory/class_a/*.txt` and
    `main_directory/class_b/*.txt`, the dataset yields batches of texts
    with labels 0 (`class_a`) and 1 (`class_b`).

    Args:
        directory: Directory where the data is located. If `labels` is
            `"inferred"`, it should contain one subdirectory of text files
            per class; otherwise the structure is ignored.
        labels: `"inferred"`, `None` (no labels), or a list/tuple of integer
            labels, one per text file, in the alphanumeric order of the
            file paths.
        label_mode: `"int"` (int32, `(batch_size,)`), `"categorical"`
            (float32 one-hot, `(batch_size, num_classes)`), `"binary"`
            (float32, `(batch_size, 1)`, exactly 2 classes) or `None`.
        class_names: Only with `labels="inferred"`: the class names
            (subdirectory names), in label order.
        batch_size: Texts per batch, or `None` for single texts.
        max_length: Maximum number of characters kept of each text, or
            `None` for all.
        shuffle: Whether to shuffle: once with `seed` (Keras's global
            shuffle, which also decides the split), then the training texts
            anew each epoch, as a pure function of `seed` and the epoch.
        seed: Seed of the shuffles; `None` draws one.
        validation_split: Optional fraction in (0, 1) kept for validation.
        subset: `"training"`, `"validation"` or `"both"` (returns
            `[training, validation]`); only with `validation_split`.
        follow_links: Whether to visit subdirectories behind symlinks.
        verbose: Whether to print the number of files and classes found.
        num_workers: `None` (one worker process per core), `0` (a
            `FileDataset` reading in the caller's process) or `>= 1`.
        **dataset_kwargs: Further arguments of the dataset
            (`drop_remainder`, `repeat`, `shard`, ...; `timeout`,
            `start_method`, `worker_init` with workers).

    Returns:
        A `PrefetchFileDataset`, a `FileDataset` with `num_workers=0`, or a
        list of two with `subset="both"`, with `class_names` and
        `file_paths`. Each item is `(texts, labels)` (or `texts`): texts a
        1-D NumPy object array of Python strings (Keras's grain path yields
        the same strings in a tuple), labels as `label_mode` says.

    Raises:
        ValueError: For what Keras rejects, with Keras's messages (bad
            `labels`, `label_mode`, split arguments, `class_names`,
            `"binary"` without 2 classes, no text files found), and a
            negative `num_workers`.
        FileNotFoundError: If `directory` does not exist.

    Reading a batch raises `keras_oom.utils.FileReadError`, naming the file,
    for a file that cannot be read or decoded.

    Example:

    ```python
    >>> import os, tempfile
    >>> from keras_oom import text_dataset_from_directory
    >>> root = tempfile.mkdtemp()
    >>> for label in ("neg", "pos"):
    ...     os.mkdir(os.path.join(root, label))
    ...     with open(os.path.join(root, label, "1.txt"), "w") as f:
    ...         _ = f.write(f"a {label} review")
    >>> ds = text_dataset_from_directory(root, shuffle=False, num_workers=0,
    ...                                  verbose=False)
    >>> texts, labels = ds[0]
    >>> texts.tolist(), labels.tolist()
    (['a neg review', 'a pos review'], [0, 1])

    ```
    """
    folder.check_labels(labels, class_names, "text", "text samples")
    folder.check_label_mode(label_mode)
    if labels is None or label_mode is None:
        labels, label_mode = None, None
    folder.check_split(validation_split, subset, shuffle, seed)
    folder.check_batch_size(batch_size)
    num_workers = folder.check_num_workers(num_workers)
    if max_length is not None and (
        isinstance(max_length, bool)
        or not isinstance(max_length, int)
        or max_length < 0
    ):
        raise ValueError(
            "`max_length` must be None or an integer >= 0. "
            f"Received: max_length={max_length!r}"
        )
    loader = TextLoader(max_length)
    return folder.forward(
        locals(),  # the checked arguments, by name: folder.FORWARDED
        formats=(".txt",),
        make_loader=lambda: loader,
        noun="text files",
        allowed="Allowed format: .txt",
    )
