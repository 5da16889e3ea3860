"""keras-oom: Keras datasets for data that does not fit in memory.

`LoaderDataset` loads each batch with your loader function; its subclass
`PrefetchLoaderDataset` loads ahead in a fixed pool of worker processes.
`SyncEpoch` is a Keras callback that keeps datasets on Keras's epoch index,
so that resumed runs read the same data. `batch_array` allocates a batch
that a worker sends with no copy, and `stack_samples` makes a batch loader
from a loader of one sample, with threads inside each process.

Keras's dataset utilities come on top of the pool, without TensorFlow:
`image_dataset_from_directory`, `text_dataset_from_directory`,
`audio_dataset_from_directory` and `timeseries_dataset_from_array` take
Keras's parameters and return these datasets (`keras_oom.utils`).

Every name but the errors is imported on first use, so that
worker processes, which import this package but never Keras, start quickly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keras_oom.errors import (
    DatasetClosedError,
    WorkerDiedError,
    WorkerStartError,
    WorkerTimeoutError,
)

if TYPE_CHECKING:
    from keras_oom.arrays import batch_array
    from keras_oom.callbacks import SyncEpoch
    from keras_oom.dataset import LoaderDataset
    from keras_oom.prefetch import PrefetchLoaderDataset
    from keras_oom.samples import stack_samples
    from keras_oom.utils import (
        audio_dataset_from_directory,
        image_dataset_from_directory,
        text_dataset_from_directory,
        timeseries_dataset_from_array,
    )

__all__ = [
    "DatasetClosedError",
    "LoaderDataset",
    "PrefetchLoaderDataset",
    "SyncEpoch",
    "WorkerDiedError",
    "WorkerStartError",
    "WorkerTimeoutError",
    "audio_dataset_from_directory",
    "batch_array",
    "image_dataset_from_directory",
    "stack_samples",
    "text_dataset_from_directory",
    "timeseries_dataset_from_array",
]
__version__ = "0.1.0"

_LAZY = {
    "LoaderDataset": "keras_oom.dataset",
    "PrefetchLoaderDataset": "keras_oom.prefetch",
    "SyncEpoch": "keras_oom.callbacks",
    "batch_array": "keras_oom.arrays",
    "stack_samples": "keras_oom.samples",
    "image_dataset_from_directory": "keras_oom.utils.images",
    "text_dataset_from_directory": "keras_oom.utils.text",
    "audio_dataset_from_directory": "keras_oom.utils.audio",
    "timeseries_dataset_from_array": "keras_oom.utils.timeseries",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_oom' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
