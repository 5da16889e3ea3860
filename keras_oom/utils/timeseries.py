"""`timeseries_dataset_from_array`: Keras's sliding windows, as index arithmetic."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from keras_oom.dataset import LoaderDataset
from keras_oom.prefetch import PrefetchLoaderDataset
from keras_oom.utils import directory as folder
from keras_oom.utils.file_io import Unbatched
from keras_oom.utils.windows import WindowLoader


def timeseries_dataset_from_array(
    data: Any,
    targets: Any,
    sequence_length: int,
    sequence_stride: int = 1,
    sampling_rate: int = 1,
    batch_size: int | None = 128,
    shuffle: bool = False,
    seed: int | None = None,
    start_index: int | None = None,
    end_index: int | None = None,
    *,
    num_workers: int | None = 0,
    **dataset_kwargs: Any,
) -> LoaderDataset:
    """Creates a dataset of sliding windows over a timeseries, as Keras does.

    Takes the parameters, defaults and semantics of
    `keras.utils.timeseries_dataset_from_array` and returns a keras-oom
    dataset: the same windows, targets and start positions as Keras's, for
    the same arguments and `seed`. A window is index arithmetic, so a batch
    is one gather (`np.take`) from `data`: `data` may be a `np.memmap`
    larger than memory. Neither TensorFlow nor Grain is needed.

    Window `i` starts at `start_positions[i]` (`0, sequence_stride, ...`,
    shuffled once with `seed` when `shuffle=True`, as Keras does) and is
    `data[start_index + p + k * sampling_rate]` for `k` in
    `range(sequence_length)`; its target is `targets[start_index + p]`.

    Args:
        data: Array (or `np.memmap`, or list) of timesteps, axis 0 the time.
        targets: Targets aligned with `data`'s timesteps, or `None`.
        sequence_length: Timesteps per window.
        sequence_stride: Timesteps between the starts of two windows.
        sampling_rate: Timesteps between two samples within a window.
        batch_size: Windows per batch, or `None` for single windows.
        shuffle: Whether to shuffle the windows: once with `seed` (Keras's
            shuffle of the start positions), then anew in every epoch, as a
            pure function of `seed` and the epoch.
        seed: Seed of the shuffles; `None` draws one.
        start_index: Timesteps before it are left out (Keras's meaning).
        end_index: Timesteps from it on are left out.
        num_workers: `0` (the default: a gather is cheaper than sending a
            batch from another process) returns a `LoaderDataset`; `None`
            (one per core) or `>= 1` a `PrefetchLoaderDataset` whose workers
            get `data` (by fork, or pickled: use a `np.memmap` for big data).
        **dataset_kwargs: Further arguments of the dataset (`drop_remainder`,
            `repeat`, `shard`, ...; `timeout`, `start_method`, `worker_init`
            with workers).

    Returns:
        A `LoaderDataset` (or `PrefetchLoaderDataset`) whose items are
        `windows` of shape `(batch_size, sequence_length, *data.shape[1:])`,
        or `(windows, targets)` with targets, dtypes as `data` and
        `targets`.

    Raises:
        ValueError: For what Keras rejects, with Keras's messages: a
            `start_index`, `end_index`, `sampling_rate` or
            `sequence_stride` out of range; and for a negative
            `num_workers`, or no window at all.

    Example:

    ```python
    >>> import numpy as np
    >>> from keras_oom import timeseries_dataset_from_array
    >>> ds = timeseries_dataset_from_array(np.arange(10), np.arange(10) * 10,
    ...                                    sequence_length=3, batch_size=4)
    >>> x, y = ds[0]
    >>> x.tolist(), y.tolist()
    ([[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]], [0, 10, 20, 30])

    ```
    """
    _check_arguments(data, start_index, end_index, sampling_rate, sequence_stride)
    folder.check_batch_size(batch_size)
    num_workers = folder.check_num_workers(num_workers)
    start = start_index or 0
    end = len(data) if end_index is None else end_index
    num_seqs = end - start - (sequence_length - 1) * sampling_rate
    if targets is not None:
        num_seqs = min(num_seqs, len(targets))
    starts = np.arange(0, num_seqs, sequence_stride)
    if seed is None:
        seed = int(np.random.randint(1_000_000))
    if shuffle:
        np.random.RandomState(seed).shuffle(starts)
    if len(starts) == 0:
        raise ValueError(
            "No window fits: `sequence_length` "
            f"{sequence_length} x `sampling_rate` {sampling_rate} spans more "
            f"than the {end - start} timesteps between start_index and "
            f"end_index. Received: sequence_length={sequence_length}"
        )
    labels = None
    if targets is not None:
        labels = np.asarray(targets)[start + starts]
    loader: Any = WindowLoader(data, sequence_length, sampling_rate, start)
    if batch_size is None:
        by_start = (
            None if labels is None else dict(zip(starts.tolist(), labels, strict=True))
        )
        loader, labels, batch_size = Unbatched(loader, by_start), None, 1
    common: dict[str, Any] = dict(batch_size=batch_size, shuffle=shuffle, seed=seed)
    if isinstance(loader, Unbatched):
        # A single window has no batch axis: there is no row per id to check.
        common["rows_per_id"] = None
    if num_workers == 0:
        return LoaderDataset(loader, starts, labels, **common, **dataset_kwargs)
    if num_workers is None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "num_workers reduced", UserWarning)
            return PrefetchLoaderDataset(
                loader,
                starts,
                labels,
                num_workers=folder.default_num_workers(),
                **common,
                **dataset_kwargs,
            )
    return PrefetchLoaderDataset(
        loader, starts, labels, num_workers=num_workers, **common, **dataset_kwargs
    )


def _check_arguments(
    data: Any,
    start_index: Any,
    end_index: Any,
    sampling_rate: int,
    sequence_stride: int,
) -> None:
    """Keras's checks, in Keras's order, with Keras's messages."""
    if start_index:
        if start_index < 0:
            raise ValueError(
                "`start_index` must be 0 or greater. Received: "
                f"start_index={start_index}"
            )
        _check_below_length("start_index", start_index, data)
    if end_index:
        if start_index and end_index <= start_index:
            raise ValueError(
                "`end_index` must be higher than `start_index`. "
                f"Received: start_index={start_index}, and "
                f"end_index={end_index} "
            )
        _check_below_length("end_index", end_index, data)
        if end_index <= 0:
            raise ValueError(
                f"`end_index` must be higher than 0. Received: end_index={end_index}"
            )
    for name, value in (
        ("sampling_rate", sampling_rate),
        ("sequence_stride", sequence_stride),
    ):
        if value <= 0:
            raise ValueError(
                f"`{name}` must be higher than 0. Received: {name}={value}"
            )
        _check_below_length(name, value, data)


def _check_below_length(name: str, value: int, data: Any) -> None:
    if value >= len(data):
        raise ValueError(
            f"`{name}` must be lower than the length of the data. "
            f"Received: {name}={value}, for data of length {len(data)}"
        )
