"""Reading one text or WAV file, and the error that names an unreadable file.

This module runs in worker processes: numpy and the standard library only,
never Keras or a backend.
"""

from __future__ import annotations

import wave
from typing import Any

import numpy as np

from keras_oom.samples import batch_array


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


class TextLoader:
    """`loader(paths) -> texts`: files read as Keras's grain path reads them.

    Keras's `text_dataset_from_directory(format="grain")` reads each file
    with `open(path, "r")` (text mode: the locale's encoding, universal
    newlines) and keeps its first `max_length` characters; so does this
    loader, returning the batch as a 1-D object array of Python strings.
    """

    def __init__(self, max_length: int | None = None) -> None:
        self.max_length = max_length

    def read(self, path: str) -> str:
        """One file's text, cut to `max_length` characters."""
        try:
            with open(path) as f:  # as Keras: text mode, default encoding
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise FileReadError(path, str(e)) from e
        return text if self.max_length is None else text[: self.max_length]

    def __call__(self, paths: Any, rng: Any = None) -> np.ndarray:
        out = np.empty(len(paths), dtype=object)
        out[:] = [self.read(str(p)) for p in paths]
        return out


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """Decodes a 16-bit PCM WAV file as `tf.audio.decode_wav` does.

    Returns:
        `(samples, sampling_rate)`: samples float32 of shape
        `(frames, channels)`, scaled to [-1, 1) by 1 / 32768.

    Raises:
        FileReadError: If the file is not a WAV file TensorFlow's decoder
            reads (16-bit PCM); the message names `path`.
    """
    try:
        with wave.open(path, "rb") as w:
            width, channels = w.getsampwidth(), w.getnchannels()
            rate, frames = w.getframerate(), w.readframes(w.getnframes())
    except (OSError, EOFError, wave.Error) as e:
        raise FileReadError(path, f"cannot decode the WAV file: {e}") from e
    if width != 2:
        raise FileReadError(
            path,
            "only 16-bit PCM WAV files are supported (as by "
            f"tf.audio.decode_wav); this one has {8 * width}-bit samples",
        )
    data = np.frombuffer(frames, dtype="<i2")
    data = data[: len(data) - len(data) % channels].reshape(-1, channels)
    return data.astype(np.float32) / np.float32(32768.0), rate


class AudioLoader:
    """`loader(paths) -> batch`: WAV files decoded and batched as Keras does.

    Keras's `audio_dataset_from_directory` decodes with
    `tf.audio.decode_wav(desired_samples=output_sequence_length)`, which
    cuts longer files and pads shorter ones with zeros, then pads a batch to
    its longest file (`padded_batch`) when there is no
    `output_sequence_length`. With `ragged`, the batch is a 1-D object
    array of the files' `(frames, channels)` arrays instead.

    Args:
        output_sequence_length: Frames per file, or `None`.
        ragged: Whether to return the files unpadded.
        sampling_rate: `None`, or the rate every file must have (keras-oom
            does not resample: a file at another rate raises).
    """

    def __init__(
        self,
        output_sequence_length: int | None,
        ragged: bool,
        sampling_rate: int | None,
    ) -> None:
        self.output_sequence_length = output_sequence_length
        self.ragged = ragged
        self.sampling_rate = sampling_rate

    def read(self, path: str) -> np.ndarray:
        """One file as `(frames, channels)` float32, cut or padded."""
        data, rate = read_wav(path)
        if self.sampling_rate is not None and rate != self.sampling_rate:
            raise FileReadError(
                path,
                f"its sampling rate is {rate} Hz, not sampling_rate="
                f"{self.sampling_rate} (keras-oom does not resample)",
            )
        n = self.output_sequence_length
        if n is not None and len(data) != n:
            out = np.zeros((n, data.shape[1]), np.float32)
            out[: min(n, len(data))] = data[:n]
            data = out
        return data

    def __call__(self, paths: Any, rng: Any = None) -> np.ndarray:
        clips = [self.read(str(p)) for p in paths]
        if self.ragged:
            out = np.empty(len(clips), dtype=object)
            out[:] = clips
            return out
        channels = {c.shape[1] for c in clips}
        if len(channels) > 1:
            first = next(
                p
                for p, c in zip(paths, clips, strict=True)
                if c.shape[1] != clips[0].shape[1]
            )
            raise ValueError(
                f"A batch needs one number of channels, but {str(paths[0])!r} "
                f"has {clips[0].shape[1]} and {str(first)!r} has "
                f"{channels - {clips[0].shape[1]}}: use batch_size=None or "
                "ragged=True"
            )
        frames = max(len(c) for c in clips)
        batch = batch_array((len(clips), frames, clips[0].shape[1]), np.float32)
        for k, clip in enumerate(clips):
            batch[k, : len(clip)] = clip
            batch[k, len(clip) :] = 0.0
        return batch


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
