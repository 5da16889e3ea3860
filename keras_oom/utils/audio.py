"""`audio_dataset_from_directory`: Keras's function, on the pool, without TensorFlow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras_oom.utils import directory as folder
from keras_oom.utils.directory import FileDataset, PrefetchFileDataset
from keras_oom.utils.file_io import AudioLoader

#: Keras's allow-listed audio extensions (keras.src.utils.audio_dataset_utils).
ALLOWED_FORMATS = (".wav",)


def audio_dataset_from_directory(
    directory: Any,
    labels: Any = "inferred",
    label_mode: str | None = "int",
    class_names: Sequence[str] | None = None,
    batch_size: int | None = 32,
    sampling_rate: int | None = None,
    output_sequence_length: int | None = None,
    ragged: bool = False,
    shuffle: bool = True,
    seed: int | None = None,
    validation_split: float | None = None,
    subset: str | None = None,
    follow_links: bool = False,
    verbose: bool = True,
    *,
    num_workers: int | None = None,
    **dataset_kwargs: Any,
) -> FileDataset | PrefetchFileDataset | tuple[Any, Any]:
    """Generates a dataset from WAV files in a directory, as Keras does.

    Takes the parameters, defaults and semantics of
    `keras.utils.audio_dataset_from_directory` (which itself needs
    TensorFlow) and returns a keras-oom dataset. The files, labels, class
    names and split are Keras's own (Keras's `index_directory`); each file
    is decoded as `tf.audio.decode_wav` decodes it (16-bit PCM, float32 in
    [-1, 1), shape `(frames, channels)`), cut or zero-padded to
    `output_sequence_length`, and a batch without `output_sequence_length`
    is zero-padded to its longest file, as Keras's `padded_batch`.
    TensorFlow is not needed.

    Args:
        directory: Directory where the data is located. If `labels` is
            `"inferred"`, it should contain one subdirectory of `.wav` files
            per class; otherwise the structure is ignored.
        labels: `"inferred"`, `None` (no labels), or a list/tuple of integer
            labels, one per file, in the alphanumeric order of the paths.
        label_mode: `"int"` (int32, `(batch_size,)`), `"categorical"`
            (float32 one-hot), `"binary"` (float32, `(batch_size, 1)`) or
            `None`.
        class_names: Only with `labels="inferred"`: the class names, in
            label order.
        batch_size: Files per batch, or `None` for single files.
        sampling_rate: `None`, or the sampling rate (Hz) of the files.
            Keras resamples with tensorflow-io; keras-oom does not resample,
            and reading a file at another rate raises a `FileReadError`
            naming it.
        output_sequence_length: Frames per file (longer files are cut,
            shorter ones padded with zeros), or `None`.
        ragged: Whether to return each batch unpadded: a 1-D object array
            of `(frames, channels)` float32 arrays (Keras returns a
            `tf.RaggedTensor`).
        shuffle: Whether to shuffle: once with `seed` (Keras's global
            shuffle, which also decides the split), then the training files
            anew each epoch, as a pure function of `seed` and the epoch.
        seed: Seed of the shuffles; `None` draws one.
        validation_split: Optional fraction in (0, 1) kept for validation.
        subset: `"training"`, `"validation"` or `"both"` (returns the
            tuple `(training, validation)`, as Keras).
        follow_links: Whether to visit subdirectories behind symlinks.
        verbose: Whether to print the number of files and classes found.
        num_workers: `None` (one worker process per core), `0` (a
            `FileDataset` reading in the caller's process) or `>= 1`.
        **dataset_kwargs: Further arguments of the dataset
            (`drop_remainder`, `repeat`, `shard`, ...; `timeout`,
            `start_method`, `worker_init` with workers).

    Returns:
        A `PrefetchFileDataset`, a `FileDataset` with `num_workers=0`, or a
        tuple of two with `subset="both"`, with `class_names` and
        `file_paths`. Each item is `(audio, labels)` (or `audio`): audio
        float32 of shape `(batch_size, frames, channels)`.

    Raises:
        ValueError: For what Keras rejects, with Keras's messages (bad
            `labels`, `label_mode`, `sampling_rate`, both `ragged` and
            `output_sequence_length`, split arguments, `class_names`,
            `"binary"` without 2 classes, no audio files), and a negative
            `num_workers`.
        FileNotFoundError: If `directory` does not exist.

    Reading a batch raises `keras_oom.utils.FileReadError`, naming the file,
    for a file that is not a 16-bit PCM WAV file (or not at
    `sampling_rate`), and a ValueError naming two files whose numbers of
    channels differ within a padded batch.

    Example:

    ```python
    >>> import os, tempfile, wave
    >>> from keras_oom import audio_dataset_from_directory
    >>> root = tempfile.mkdtemp()
    >>> for label, frames in (("no", 3), ("yes", 5)):
    ...     os.mkdir(os.path.join(root, label))
    ...     with wave.open(os.path.join(root, label, "1.wav"), "wb") as w:
    ...         w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
    ...         w.writeframes(b"\\x00\\x40" * frames)
    >>> ds = audio_dataset_from_directory(root, shuffle=False, num_workers=0,
    ...                                   verbose=False)
    >>> audio, labels = ds[0]
    >>> audio.shape, audio[0, :, 0].tolist(), labels.tolist()
    ((2, 5, 1), [0.5, 0.5, 0.5, 0.0, 0.0], [0, 1])

    ```
    """
    folder.check_labels(labels, class_names, "audio", "audio samples", "The ")
    folder.check_label_mode(label_mode)
    if ragged and output_sequence_length is not None:
        raise ValueError("Cannot set both `ragged` and `output_sequence_length`")
    if sampling_rate is not None:
        if not isinstance(sampling_rate, int):
            raise ValueError(
                "`sampling_rate` should have an integer value. "
                f"Received: sampling_rate={sampling_rate}"
            )
        if sampling_rate <= 0:
            raise ValueError(
                "`sampling_rate` should be higher than 0. "
                f"Received: sampling_rate={sampling_rate}"
            )
    if output_sequence_length is not None and (
        isinstance(output_sequence_length, bool)
        or not isinstance(output_sequence_length, int)
        or output_sequence_length < 1
    ):
        raise ValueError(
            "`output_sequence_length` must be None or a positive integer. "
            f"Received: output_sequence_length={output_sequence_length!r}"
        )
    if labels is None or label_mode is None:
        labels, label_mode = None, None
    folder.check_split(validation_split, subset, shuffle, seed)
    folder.check_batch_size(batch_size)
    num_workers = folder.check_num_workers(num_workers)
    loader = AudioLoader(output_sequence_length, bool(ragged), sampling_rate)
    out = folder.forward(
        locals(),  # the checked arguments, by name: folder.FORWARDED
        formats=ALLOWED_FORMATS,
        make_loader=lambda: loader,
        noun="audio files",
        allowed=f"Allowed format(s): {ALLOWED_FORMATS}",
    )
    return tuple(out) if isinstance(out, list) else out  # a tuple, as Keras
