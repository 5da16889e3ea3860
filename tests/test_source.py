"""`BatchSource` (source.py): the argument checks both dataset classes share.

Sample ids, labels, the batch size and the seed are validated once, in
`BatchSource`; each bad value is refused with an error naming the argument
and the value. Seen here through `LoaderDataset`, which builds one, and,
at the end, driven directly for what the dataset classes delegate to it.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np
import pytest

from keras_oom import LoaderDataset


def identity(ids):
    return np.asarray(ids)


@pytest.mark.parametrize(
    ("batch_size", "error", "shown"),
    [
        (0, ValueError, "batch_size=0"),
        (-3, ValueError, "batch_size=-3"),
        (2.5, TypeError, "batch_size=2.5"),
        (4.0, TypeError, "batch_size=4.0"),
        ("4", TypeError, "batch_size='4'"),
        (None, TypeError, "batch_size=None"),
        (True, TypeError, "batch_size=True"),
    ],
)
def test_bad_batch_size(batch_size, error, shown):
    with pytest.raises(error, match=shown):
        LoaderDataset(identity, np.arange(10), batch_size=batch_size)


def test_numpy_integer_batch_size_is_accepted():
    ds = LoaderDataset(identity, np.arange(10), batch_size=np.int64(4))
    assert len(ds) == 3 and ds.batch_size == 4 and type(ds.batch_size) is int


def test_batch_size_larger_than_the_samples_gives_one_short_batch():
    """Issue 10.4: predict on 10 paths with batch_size=64 works, as in Keras."""
    ds = LoaderDataset(identity, np.arange(10), labels=np.arange(10), batch_size=64)
    assert len(ds) == 1
    x, y = ds[0]
    np.testing.assert_array_equal(x, np.arange(10))
    np.testing.assert_array_equal(y, np.arange(10))


def test_batch_size_larger_than_the_samples_with_drop_remainder_is_an_error():
    with pytest.raises(ValueError, match=r"batch_size=11") as info:
        LoaderDataset(identity, np.arange(10), batch_size=11, drop_remainder=True)
    assert "10" in str(info.value) and "drop_remainder" in str(info.value)


@pytest.mark.parametrize("empty", [[], np.array([]), np.zeros(0, dtype=int), ()])
def test_empty_sample_ids(empty):
    with pytest.raises(ValueError, match=r"sample_ids.*(empty|0)"):
        LoaderDataset(identity, empty, batch_size=1)


@pytest.mark.parametrize(
    ("ids", "shape"),
    [
        (np.zeros((2, 3)), r"\(2, 3\)"),
        (np.int64(5), r"\(\)"),
        ([[1], [2]], r"\(2, 1\)"),
    ],
)
def test_non_1d_sample_ids(ids, shape):
    with pytest.raises(ValueError, match=r"sample_ids") as info:
        LoaderDataset(identity, ids, batch_size=1)
    assert re.search(shape, str(info.value))


def test_missing_sample_ids():
    with pytest.raises(ValueError, match=r"sample_ids.*None"):
        LoaderDataset(identity, batch_size=1)


@pytest.mark.parametrize(
    ("labels", "name", "got"),
    [
        (np.arange(4), "labels", "4"),
        (list(range(6)), "labels", "6"),
        ({"a": np.arange(5), "b": np.arange(3)}, r"labels\['b'\]", "3"),
        (OrderedDict(a=np.arange(7)), r"labels\['a'\]", "7"),
        ((np.arange(5), np.arange(2)), r"labels\[1\]", "2"),
    ],
)
def test_labels_of_another_length(labels, name, got):
    with pytest.raises(ValueError, match=name) as info:
        LoaderDataset(identity, np.arange(5), labels=labels, batch_size=2)
    message = str(info.value)
    assert got in message and "5" in message  # both lengths


def test_scalar_labels():
    with pytest.raises(ValueError, match=r"labels.*scalar"):
        LoaderDataset(identity, np.arange(5), labels=3, batch_size=2)


@pytest.mark.parametrize(
    ("seed", "error"), [(-1, ValueError), (1.5, TypeError), ("7", TypeError)]
)
def test_bad_seed(seed, error):
    with pytest.raises(error, match=f"seed={seed!r}|seed={seed}"):
        LoaderDataset(identity, np.arange(5), batch_size=2, seed=seed)


# -- BatchSource driven directly: what the dataset classes delegate to it --


def test_check_rows_raises_with_labels_and_words_a_warning_without():
    """A loader that returns a row short: an error when labels would be
    paired with the wrong rows, else the warning text the dataset gives."""
    from keras_oom.source import BatchSource

    short = np.zeros((3, 2))  # 4 ids, 3 rows
    labelled = BatchSource(np.arange(8), np.arange(8), batch_size=4)
    with pytest.raises(ValueError, match=r"3 rows in x .* its labels, so"):
        labelled.check_rows(short, 0, 1, index=1)
    plain = BatchSource(np.arange(8), batch_size=4)
    warning = plain.check_rows(short, 0, 1, index=1)
    assert warning is not None and "batch 1, ids [4, 5, 6, ... (4 ids)]" in warning
    assert "more or fewer samples than ids" in warning
    assert plain.check_rows(np.zeros((4, 2)), 0, 1, index=1) is None


def test_load_notes_the_batch_and_its_ids_on_the_loaders_exception():
    """A loader's exception reaches the caller itself, noted with the index
    the caller asked for and the batch's ids."""
    from keras_oom.source import BatchSource

    def broken(ids):
        raise KeyError("missing file")

    source = BatchSource(np.arange(8), batch_size=4)
    with pytest.raises(KeyError, match="missing file") as info:
        source.load(broken, False, 0, 1, index=-1)
    assert info.value.__notes__ == [
        "keras_oom: while loading batch -1, ids [4, 5, 6, ... (4 ids)]"
    ]
