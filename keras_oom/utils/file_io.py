"""Reading one text or WAV file, and the error that names an unreadable file.

This module runs in worker processes: numpy and the standard library only,
never Keras or a backend.
"""

from __future__ import annotations

import wave
from typing import Any

import numpy as np


class FileReadError(OSError):
    """A data file could not be read or decoded.

    Raised when the batch that holds the file is read (in the caller, also
    when a worker read it), with the original error as its cause.

    Attributes:
        path: The file's path.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"Cannot read {path!r}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> Any:  # keep `path` across processes
        return (type(self), (self.path, self.reason))


class TextReader:
    """`reader(path) -> str`: a file's first `max_length` characters, as Keras.

    Keras's `text_dataset_from_directory(format="grain")` reads the file
    with `open(path, "r")` (text mode: the locale's encoding, universal
    newlines) and keeps the first `max_length` characters; so does this
    reader, returning a 0-d array holding the Python string.
    """

    def __init__(self, max_length: int | None = None) -> None:
        self.max_length = max_length

    def __call__(self, path: Any) -> np.ndarray:
        try:
            with open(str(path)) as f:  # as Keras: text mode, default encoding
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise FileReadError(str(path), str(e)) from e
        if self.max_length is not None:
            text = text[: self.max_length]
        return np.asarray(text, dtype=object)


class WavReader:
    """`reader(path) -> (samples, channels)`: a PCM WAV file as float32.

    Decodes as TensorFlow's `tf.audio.decode_wav` does (what Keras's
    `audio_dataset_from_directory` uses): 16-bit PCM scaled to [-1, 1) by
    1 / 32768, one column per channel. Files of other sample widths raise
    a `FileReadError`, as `decode_wav` rejects them.

    Args:
        num_channels: Columns to keep (the first ones), or `None` for all.
    """

    def __init__(self, num_channels: int | None = None) -> None:
        self.num_channels = num_channels

    def __call__(self, path: Any) -> tuple[np.ndarray, int]:
        """Returns `(samples, sampling_rate)`; samples float32 `(n, channels)`."""
        try:
            with wave.open(str(path), "rb") as w:
                width, channels = w.getsampwidth(), w.getnchannels()
                rate, frames = w.getframerate(), w.readframes(w.getnframes())
        except (OSError, EOFError, wave.Error) as e:
            raise FileReadError(str(path), f"cannot decode the WAV file: {e}") from e
        if width != 2:
            raise FileReadError(
                str(path),
                f"only 16-bit PCM WAV files are supported (as tf.audio.decode_wav); "
                f"this one has {8 * width}-bit samples",
            )
        data = np.frombuffer(frames, dtype="<i2").reshape(-1, channels)
        if self.num_channels is not None:
            data = data[:, : self.num_channels]
        return data.astype(np.float32) / np.float32(32768.0), rate


class Unbatched:
    """`loader(ids, rng)` for `batch_size=None`: one sample, and its label.

    Keras's functions yield single samples when `batch_size=None`. The
    dataset then reads batches of one id; this wrapper drops the batch axis
    of what `loader` returns and pairs it with the sample's label (labels
    kept here, not by the dataset, whose labels would keep their batch axis).

    Args:
        loader: A batch loader, `loader(ids, rng)`.
        labels: `None`, or a dict from sample id to its encoded label.
    """

    def __init__(self, loader: Any, labels: dict[Any, Any] | None) -> None:
        self.loader = loader
        self.labels = labels

    def __call__(self, ids: Any, rng: np.random.Generator | None = None) -> Any:
        x = self.loader(ids, rng=rng)
        x = tuple(part[0] for part in x) if isinstance(x, tuple) else x[0]
        if self.labels is None:
            return x
        return x, self.labels[ids[0]]
