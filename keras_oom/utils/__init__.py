"""Keras's dataset utilities on the pool, without TensorFlow.

Each function takes the parameters, defaults and semantics of its Keras
namesake and returns a keras-oom dataset:

- `image_dataset_from_directory` (images.py; what workers run in
  image_readers.py, over image_decode.py and image_resize.py),
- `text_dataset_from_directory` (text.py),
- `audio_dataset_from_directory` (audio.py),
- `timeseries_dataset_from_array` (timeseries.py).

`directory.py` holds what the folder functions share (Keras's walk, labels
and split; the dataset classes `FileDataset` and `PrefetchFileDataset`);
`file_io.py` reads text and WAV files and defines `FileReadError`.

Names are imported on first use: worker processes unpickle readers from
`image_readers.py` and `file_io.py`, which import neither Keras nor a backend,
and must not import the rest of this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keras_oom import _import_lazily

if TYPE_CHECKING:
    from keras_oom.utils.audio import audio_dataset_from_directory
    from keras_oom.utils.directory import FileDataset, PrefetchFileDataset
    from keras_oom.utils.file_io import FileReadError
    from keras_oom.utils.images import image_dataset_from_directory
    from keras_oom.utils.text import text_dataset_from_directory
    from keras_oom.utils.timeseries import timeseries_dataset_from_array

_LAZY = {
    "FileDataset": "keras_oom.utils.directory",
    "FileReadError": "keras_oom.utils.file_io",
    "PrefetchFileDataset": "keras_oom.utils.directory",
    "audio_dataset_from_directory": "keras_oom.utils.audio",
    "image_dataset_from_directory": "keras_oom.utils.images",
    "text_dataset_from_directory": "keras_oom.utils.text",
    "timeseries_dataset_from_array": "keras_oom.utils.timeseries",
}
__all__ = [
    "FileDataset",
    "FileReadError",
    "PrefetchFileDataset",
    "audio_dataset_from_directory",
    "image_dataset_from_directory",
    "text_dataset_from_directory",
    "timeseries_dataset_from_array",
]


def __getattr__(name: str) -> Any:
    return _import_lazily(__name__, _LAZY, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
