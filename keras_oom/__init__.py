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

import importlib
import sys
from collections.abc import Mapping
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
    # keras_oom.utils knows which of its modules defines each.
    "image_dataset_from_directory": "keras_oom.utils",
    "text_dataset_from_directory": "keras_oom.utils",
    "audio_dataset_from_directory": "keras_oom.utils",
    "timeseries_dataset_from_array": "keras_oom.utils",
}


def _import_lazily(package: str, table: Mapping[str, str], name: str) -> Any:
    """A package's `__getattr__` (PEP 562): `name` imported on first use.

    Shared by this package and `keras_oom.utils`. `table` maps each lazy
    name to the module that defines it; the value is then stored in the
    package, so the next access is a plain attribute.

    Raises:
        AttributeError: If `name` is not in `table`, as for any module.
    """
    module = table.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    setattr(sys.modules[package], name, value)
    return value


def __getattr__(name: str) -> Any:
    return _import_lazily(__name__, _LAZY, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
