"""`text_dataset_from_directory` against Keras's own (issue 15).

Keras's `format="grain"` dataset is the reference: the same files, labels,
classes and split for the same arguments, and the same strings.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

from keras_oom import LoaderDataset, PrefetchLoaderDataset, text_dataset_from_directory
from keras_oom.utils import FileReadError


def _keras(directory, **kwargs):
    pytest.importorskip("grain")
    return keras.utils.text_dataset_from_directory(
        directory, format="grain", verbose=False, **kwargs
    )


def _batches(ds):
    out = []
    for b in ds:
        parts = (
            b
            if isinstance(b, tuple) and len(b) == 2 and not isinstance(b[0], str)
            else (b,)
        )
        out.append((_texts(parts[0]), *(np.asarray(p) for p in parts[1:])))
    return out


def _texts(part):
    """Keras's texts as a list of str: a tuple of str, or (on TensorFlow) bytes."""
    items = list(part) if isinstance(part, tuple) else np.asarray(part).tolist()
    return [t.decode("utf-8") if isinstance(t, bytes) else t for t in items]


def _ours(directory, **kwargs):
    kwargs.setdefault("num_workers", 0)
    return text_dataset_from_directory(directory, verbose=False, **kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of text files, with unicode, newlines and ignored files."""
    root = tmp_path_factory.mktemp("texts")
    texts = {
        "neg/1.txt": "bad\nreally bad",
        "neg/2.txt": "worst film — ever ☹",
        "neg/3.txt": "",
        "neg/sub/4.txt": "nested and windows\r\nline ends",
        "pos/1.txt": "great",
        "pos/2.txt": "good " * 40,
        "pos/3.txt": "naïve but fun",
        "pos/notes.md": "not a .txt file",
    }
    for name, text in texts.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    return root


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(shuffle=False),
        dict(shuffle=False, max_length=6),
        dict(shuffle=False, label_mode="categorical", batch_size=3),
        dict(shuffle=False, label_mode="binary", batch_size=5),
        dict(shuffle=False, labels=None),
        dict(shuffle=False, class_names=["pos", "neg"]),
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
def test_texts_and_labels_equal_keras_grain(folder, kwargs):
    """Kind texts: the same strings, labels, dtypes and order as Keras's."""
    ref_ds = _keras(folder, **kwargs)
    ref = _batches(ref_ds)
    ds = _ours(folder, **kwargs)
    # Keras's text dataset has no `file_paths`: the strings show the order.
    assert ds.class_names == ref_ds.class_names
    ours = [ds[i] for i in range(len(ds))]
    ours = [b if isinstance(b, tuple) else (b,) for b in ours]
    assert len(ours) == len(ref)
    for mine, theirs in zip(ours, ref, strict=True):
        assert mine[0].dtype == object and mine[0].tolist() == list(theirs[0])
        assert all(type(t) is str for t in mine[0].tolist())
        for a, b in zip(mine[1:], theirs[1:], strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


def test_split_equals_keras(folder):
    """Kind split: the same training and validation files as Keras's."""
    kwargs = dict(validation_split=0.3, subset="both", seed=4)
    ref_train, ref_val = (_batches(d) for d in _keras(folder, **kwargs))
    train, val = _ours(folder, **kwargs)
    # Validation is unshuffled in both: the same strings in the same order.
    assert [t for b in ref_val for t in b[0]] == [
        t for i in range(len(val)) for t in val[i][0].tolist()
    ]
    assert sorted(t for b in ref_train for t in b[0]) == sorted(
        t for i in range(len(train)) for t in train[i][0].tolist()
    )
    assert val.shuffle is False and train.shuffle is True


def test_batch_size_none_yields_single_strings(folder):
    """Kind batching: batch_size=None gives (text, label) without batch axis."""
    ds = _ours(folder, batch_size=None, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a single sample has no rows to check
        text, label = ds[0]
    assert type(text) is str and text == "bad\nreally bad"
    assert label.shape == () and int(label) == 0


@pytest.mark.timeout(60)
def test_workers_return_the_same_strings(folder):
    """Kind num_workers: 0 gives a LoaderDataset; 2 workers give the same."""
    plain = _ours(folder, seed=1, batch_size=2)
    assert isinstance(plain, LoaderDataset)
    assert not isinstance(plain, PrefetchLoaderDataset)
    with _ours(folder, seed=1, batch_size=2, num_workers=2) as pooled:
        for i in range(len(plain)):
            assert pooled[i][0].tolist() == plain[i][0].tolist()
            assert pooled[i][1].tolist() == plain[i][1].tolist()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(labels="folders"),
        dict(labels=[0, 1], class_names=["neg"]),
        dict(label_mode="sparse"),
        dict(validation_split=0.2),
        dict(validation_split=0.2, subset="training"),
        dict(class_names=["neg", "zz"]),
        dict(labels=[0, 1]),
    ],
    ids=lambda k: ",".join(k),
)
def test_bad_arguments_raise_keras_errors(folder, kwargs):
    """Kind bad input: the same exception type and message as Keras's."""
    with pytest.raises(ValueError) as theirs:
        _keras(folder, **kwargs)
    with pytest.raises(ValueError) as mine:
        _ours(folder, **kwargs)
    assert str(mine.value) == str(theirs.value)


def test_folder_without_text_files_raises_as_keras(tmp_path):
    """Kind bad input: no .txt file is Keras's ValueError."""
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError) as theirs:
        _keras(tmp_path)
    with pytest.raises(ValueError) as mine:
        _ours(tmp_path)
    assert str(mine.value) == str(theirs.value)


def test_bad_max_length_raises_naming_it(folder):
    """Kind bad input: max_length must be None or an integer >= 0."""
    with pytest.raises(ValueError, match="`max_length` must be None"):
        _ours(folder, max_length=-2)


def test_undecodable_file_raises_file_read_error_naming_it(tmp_path):
    """Kind corrupt file: bytes that are not text name the file when read."""
    (tmp_path / "a").mkdir()
    bad = tmp_path / "a" / "x.txt"
    bad.write_bytes(b"\xff\xfe\xfa not utf-8")
    ds = _ours(tmp_path, batch_size=1)
    with pytest.raises(FileReadError, match=r"x\.txt") as info:
        ds[0]
    assert info.value.path == str(bad)
