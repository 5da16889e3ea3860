"""`audio_dataset_from_directory` against Keras's own and known samples (issue 15).

Keras's function needs TensorFlow (`tf.audio.decode_wav`, `tf.data`): the
comparisons with it skip, with that reason, where TensorFlow is not
installed (the default test session); `nox -s tests-tensorflow` runs them.
The tests against known sample values run everywhere.
"""

from __future__ import annotations

import wave

import keras
import numpy as np
import pytest

from keras_oom import LoaderDataset, PrefetchLoaderDataset, audio_dataset_from_directory
from keras_oom.utils import FileReadError

RATE = 8000


def _write(path, samples, rate=RATE, width=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.asarray(samples)
    if samples.ndim == 1:
        samples = samples[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        wide = samples.astype("<i4").reshape(-1, 1).view(np.uint8)
        w.writeframes(wide[:, :width].tobytes())  # little-endian: low bytes


def _clip(n, seed, channels=1):
    rng = np.random.default_rng(seed)
    return rng.integers(-32768, 32767, size=(n, channels)).astype(np.int16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of mono 16-bit WAVs of different lengths, and a non-WAV."""
    root = tmp_path_factory.mktemp("audio")
    lengths = {
        "down/1.wav": 50,
        "down/2.wav": 80,
        "down/3.wav": 13,
        "up/1.wav": 64,
        "up/2.wav": 7,
        "up/sub/3.wav": 90,
    }
    for k, (name, n) in enumerate(lengths.items()):
        _write(root / name, _clip(n, k))
    (root / "up" / "readme.txt").write_text("not audio")
    return root


def _ours(directory, **kwargs):
    kwargs.setdefault("num_workers", 0)
    return audio_dataset_from_directory(directory, verbose=False, **kwargs)


def _keras(directory, **kwargs):
    pytest.importorskip(
        "tensorflow",
        reason="Keras's audio_dataset_from_directory needs TensorFlow "
        "(nox -s tests-tensorflow installs it)",
    )
    ds = keras.utils.audio_dataset_from_directory(directory, verbose=False, **kwargs)
    return ds


def _batches(ds):
    out = []
    for b in ds:
        parts = b if isinstance(b, tuple) else (b,)
        out.append(tuple(np.asarray(p) for p in parts))
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(output_sequence_length=40, batch_size=4),
        dict(output_sequence_length=100, label_mode="categorical"),
        dict(label_mode="binary", batch_size=5),
        dict(labels=None, batch_size=2),
        dict(class_names=["up", "down"], batch_size=3),
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default",
)
def test_audio_and_labels_equal_keras(folder, kwargs):
    """Kind audio: the same padded batches, labels and dtypes as Keras's."""
    kwargs = dict(kwargs, shuffle=False)
    ref_ds = _keras(folder, **kwargs)
    ref = _batches(ref_ds)
    ds = _ours(folder, **kwargs)
    assert ds.class_names == ref_ds.class_names
    ours = [ds[i] for i in range(len(ds))]
    ours = [b if isinstance(b, tuple) else (b,) for b in ours]
    assert len(ours) == len(ref)
    for mine, theirs in zip(ours, ref, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


def test_split_and_shuffle_equal_keras_files(folder):
    """Kind split: Keras's training / validation membership (a tuple)."""
    kwargs = dict(validation_split=0.34, subset="both", seed=2, batch_size=None)
    ref_train, ref_val = _keras(folder, **kwargs)
    train, val = _ours(folder, **kwargs)
    # Validation is unshuffled in both: the same clips in the same order.
    assert [x.tobytes() for x, _ in _batches(ref_val)] == [
        val[i][0].tobytes() for i in range(len(val))
    ]
    assert sorted(x.tobytes() for x, _ in _batches(ref_train)) == sorted(
        train[i][0].tobytes() for i in range(len(train))
    )


def test_samples_are_int16_over_32768_padded_to_the_longest(folder):
    """Kind decoding: decode_wav's scale and padded_batch's zeros."""
    ds = _ours(folder, shuffle=False, batch_size=3, label_mode=None)
    batch = ds[0]  # down/1 (50), down/2 (80), down/3 (13)
    assert batch.shape == (3, 80, 1) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0, :50], _clip(50, 0) / np.float32(32768))
    assert not batch[0, 50:].any() and not batch[2, 13:].any()


def test_output_sequence_length_cuts_and_pads(folder):
    """Kind decoding: output_sequence_length cuts long and pads short files."""
    ds = _ours(folder, shuffle=False, batch_size=None, output_sequence_length=20)
    clip, label = ds[0]
    assert clip.shape == (20, 1) and int(label) == 0
    np.testing.assert_array_equal(clip, _clip(50, 0)[:20] / np.float32(32768))
    short, _ = ds[2]  # 13 frames
    assert short.shape == (20, 1) and not short[13:].any()


def test_ragged_batches_keep_each_length(folder):
    """Kind ragged: a batch is an object array of unpadded clips."""
    ds = _ours(folder, shuffle=False, batch_size=3, ragged=True, label_mode=None)
    assert [c.shape for c in ds[0]] == [(50, 1), (80, 1), (13, 1)]


def test_stereo_files_keep_their_channels(tmp_path):
    """Kind decoding: two channels give (frames, 2)."""
    _write(tmp_path / "a" / "s.wav", _clip(30, 5, channels=2))
    x, _ = _ours(tmp_path, batch_size=None)[0]
    np.testing.assert_array_equal(x, _clip(30, 5, channels=2) / np.float32(32768))


@pytest.mark.timeout(60)
def test_workers_return_the_same_batches(folder):
    """Kind num_workers: 0 gives a LoaderDataset; 2 workers give the same."""
    plain = _ours(folder, seed=3, batch_size=2)
    assert isinstance(plain, LoaderDataset)
    assert not isinstance(plain, PrefetchLoaderDataset)
    with _ours(folder, seed=3, batch_size=2, num_workers=2) as pooled:
        for i in range(len(plain)):
            for a, b in zip(plain[i], pooled[i], strict=True):
                np.testing.assert_array_equal(a, b)


def test_file_at_another_rate_raises_naming_it(tmp_path):
    """Kind sampling_rate: keras-oom does not resample; it names the file."""
    _write(tmp_path / "a" / "slow.wav", _clip(10, 0), rate=4000)
    ds = _ours(tmp_path, sampling_rate=RATE, batch_size=1)
    with pytest.raises(FileReadError, match=r"slow\.wav.*4000 Hz"):
        ds[0]


@pytest.mark.parametrize("content", ["24-bit", "garbage"])
def test_unreadable_wav_raises_file_read_error_naming_it(tmp_path, content):
    """Kind corrupt file: not 16-bit PCM WAV names the file when read."""
    bad = tmp_path / "a" / "bad.wav"
    if content == "24-bit":
        _write(bad, _clip(10, 0), width=3)
    else:
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"RIFF junk")
    ds = _ours(tmp_path, batch_size=1)
    with pytest.raises(FileReadError, match=r"bad\.wav") as info:
        ds[0]
    assert info.value.path == str(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(labels="folders"),
        dict(label_mode="sparse"),
        dict(ragged=True, output_sequence_length=10),
        dict(sampling_rate=8000.0),
        dict(sampling_rate=-1),
        dict(validation_split=0.2),
        dict(class_names=["up", "zz"]),
        dict(labels=[0, 1]),
    ],
    ids=lambda k: ",".join(k),
)
def test_bad_arguments_raise_keras_errors(folder, kwargs):
    """Kind bad input: Keras's ValueError and message (Keras's own where TF is)."""
    with pytest.raises(ValueError) as mine:
        _ours(folder, **kwargs)
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return  # Keras's function cannot run; our error was still a ValueError
    with pytest.raises(ValueError) as theirs:
        keras.utils.audio_dataset_from_directory(folder, verbose=False, **kwargs)
    assert str(mine.value) == str(theirs.value)


def test_folder_without_wav_files_raises_keras_message(tmp_path):
    """Kind bad input: no .wav file is Keras's ValueError."""
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match=r"No audio files found in directory"):
        _ours(tmp_path)
