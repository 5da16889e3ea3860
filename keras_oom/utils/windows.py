"""Sliding windows over an array: the loader of `timeseries_dataset_from_array`.

This module runs in worker processes: numpy and keras-oom's `batch_array`
only, never Keras or a backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_oom.samples import batch_array


class WindowLoader:
    """`loader(starts) -> windows`: one gather for a whole batch of windows.

    Window `p` is `data[offset + p + k * sampling_rate]` for `k` in
    `range(sequence_length)`, as in Keras. The batch is one `np.take` into
    a `batch_array`, so it crosses from a worker without a copy.

    Args:
        data: The array (anything `np.asarray` takes, a memmap stays one).
        sequence_length: Steps per window.
        sampling_rate: Steps between two samples of a window.
        offset: Keras's `start_index`: where position 0 is in `data`.
    """

    def __init__(
        self, data: Any, sequence_length: int, sampling_rate: int, offset: int
    ) -> None:
        # Lists become one array here, not at every batch; arrays (and
        # memmaps) are kept as they are.
        self.data = data if isinstance(data, np.ndarray) else np.asarray(data)
        self.steps = offset + np.arange(sequence_length) * sampling_rate

    def __call__(self, starts: Any, rng: Any = None) -> np.ndarray:
        index = np.asarray(starts, dtype=np.int64)[:, None] + self.steps[None, :]
        data = self.data
        out = batch_array(index.shape + data.shape[1:], data.dtype)
        # mode="clip": the indices are in range, and "raise" would buffer.
        np.take(data, index, axis=0, out=out, mode="clip")
        return out
