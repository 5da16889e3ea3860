"""Issue 14, Kind E item 11: a batch must have one row per sample id.

A loader that returns more (or fewer) rows than it was given ids misaligns
every row after it with its labels, or, without labels, gives `predict` more
predictions than ids. Both dataset classes check the leading dimension of
every array in the loader's output, in the caller's process, against
`len(ids) * rows_per_id`: with labels or sample weights attached by the
dataset a mismatch is a `ValueError`, without them a warning, once per
dataset. `rows_per_id` lets a loader return several rows per id on purpose.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import warnings

import keras
import numpy as np
import pytest

from keras_oom import LoaderDataset, PrefetchLoaderDataset

pytestmark = pytest.mark.timeout(60)

CLASSES = [LoaderDataset, PrefetchLoaderDataset]


def fixed_four_rows(ids):
    """A buggy loader: always 4 rows, whatever the batch holds."""
    return np.zeros((4, 2), dtype="float32") + np.resize(ids, 4)[:, None]


def one_row_too_many_in_mask(ids):
    """Right rows in `image`, one row too many in `mask`."""
    return {
        "image": np.ones((len(ids), 3), dtype="float32"),
        "mask": np.ones((len(ids) + 1, 3), dtype="float32"),
    }


def two_crops(ids):
    """Two rows per id, id by id: the id, then the id + 0.5."""
    return (
        np.repeat(ids.astype("float32"), 2)[:, None]
        + np.tile([0.0, 0.5], len(ids))[:, None]
    )


def per_id_sum(ids):
    return np.asarray(ids).sum()


def make(cls, loader, n=10, **kwargs):
    extra = {"num_workers": 1} if cls is PrefetchLoaderDataset else {}
    return cls(loader, np.arange(n), batch_size=4, **extra, **kwargs)


def row_warnings(record):
    return [w for w in record if "rows" in str(w.message)]


@pytest.mark.parametrize("cls", CLASSES)
def test_extra_rows_with_labels_raise_naming_batch_ids_and_leaf(cls):
    """Kind E: a short last batch padded to 4 rows would pair rows with the
    wrong labels; it must raise, naming the batch, its ids and the leaf."""
    ds = make(cls, fixed_four_rows, labels=np.arange(10))
    try:
        ds[0]  # 4 ids, 4 rows: fine
        with pytest.raises(ValueError, match=r"batch 2\b") as info:
            ds[2]  # ids 8, 9: 2 ids, 4 rows
    finally:
        if cls is PrefetchLoaderDataset:
            ds.close()
    message = str(info.value)
    assert "[8, 9]" in message
    assert "4 rows" in message and "2 ids" in message
    assert "x " in message or "x (" in message  # the leaf: the whole output
    assert "rows_per_id" in message


@pytest.mark.parametrize("cls", CLASSES)
def test_mismatch_in_a_nested_leaf_names_its_path(cls):
    """Kind E: the check covers every array leaf, and names the wrong one."""
    ds = make(
        cls, one_row_too_many_in_mask, labels=np.arange(10), sample_weights=np.ones(10)
    )
    try:
        with pytest.raises(ValueError, match=r"x\['mask'\]") as info:
            ds[1]
    finally:
        if cls is PrefetchLoaderDataset:
            ds.close()
    message = str(info.value)
    assert "5 rows" in message and "ids [4, 5, 6, ... (4 ids)]" in message
    assert "image" not in message


@pytest.mark.parametrize("cls", CLASSES)
def test_extra_rows_without_labels_warn_once(cls):
    """Kind E: without labels the rows are not misaligned with anything the
    dataset knows, so it warns, once per dataset, with the same facts."""
    ds = make(cls, fixed_four_rows)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            x = ds[2]
            ds[2]
            ds[0]
    finally:
        if cls is PrefetchLoaderDataset:
            ds.close()
    assert x.shape == (4, 2)  # passed on unchanged
    (w,) = row_warnings(record)
    assert issubclass(w.category, UserWarning)
    message = str(w.message)
    assert "batch 2" in message and "[8, 9]" in message and "4 rows" in message
    assert "rows_per_id" in message


@pytest.mark.parametrize("cls", CLASSES)
def test_predict_warns_when_the_loader_returns_extra_rows(cls):
    """Kind E: `predict` on 10 ids returned 12 predictions, silently."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    ds = make(cls, fixed_four_rows)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            pred = model.predict(ds, verbose=0)
    finally:
        if cls is PrefetchLoaderDataset:
            ds.close()
    assert len(pred) == 12  # what Keras made of it...
    assert len(row_warnings(record)) == 1  # ...but no longer silently


@pytest.mark.parametrize("cls", CLASSES)
def test_rows_per_id_repeats_labels_and_weights_per_id(cls):
    """Kind E: a loader that returns two crops per id says so, and each id's
    label and weight then apply to both of its rows."""
    ds = make(
        cls,
        two_crops,
        labels=np.arange(10) * 10,
        sample_weights=np.arange(10) / 10,
        rows_per_id=2,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x, y, w = ds[2]
    finally:
        if cls is PrefetchLoaderDataset:
            ds.close()
    np.testing.assert_array_equal(x[:, 0], [8, 8.5, 9, 9.5])
    np.testing.assert_array_equal(y, [80, 80, 90, 90])
    np.testing.assert_allclose(w, [0.8, 0.8, 0.9, 0.9])


@pytest.mark.parametrize("cls", CLASSES)
def test_rows_per_id_none_skips_the_check(cls):
    """Kind E: `rows_per_id=None` is the documented way out of the check."""
    ds = make(cls, per_id_sum, rows_per_id=None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ds[2] == 17
    finally:
        if cls is PrefetchLoaderDataset:
            ds.close()
    assert ds.rows_per_id is None


@pytest.mark.parametrize("cls", CLASSES)
def test_a_scalar_output_has_no_rows(cls):
    """Kind E: a 0-d array has no leading dimension to hold one row per id."""
    ds = make(cls, per_id_sum, labels=np.arange(10))
    try:
        with pytest.raises(ValueError, match=r"shape \(\)"):
            ds[0]
    finally:
        if cls is PrefetchLoaderDataset:
            ds.close()


@pytest.mark.parametrize(
    ("value", "error", "shown"),
    [
        (0, ValueError, "rows_per_id=0"),
        (-2, ValueError, "rows_per_id=-2"),
        (1.5, TypeError, "rows_per_id=1.5"),
        ("2", TypeError, "rows_per_id='2'"),
        (True, TypeError, "rows_per_id=True"),
    ],
)
def test_bad_rows_per_id(value, error, shown):
    with pytest.raises(error, match=shown):
        LoaderDataset(fixed_four_rows, np.arange(10), rows_per_id=value)


def test_rows_per_id_none_with_labels_is_refused():
    """Unchecked rows cannot be paired with labels the dataset attaches."""
    with pytest.raises(ValueError, match=r"rows_per_id=None.*labels"):
        LoaderDataset(per_id_sum, np.arange(10), labels=np.arange(10), rows_per_id=None)


def test_numpy_integer_rows_per_id_is_accepted():
    ds = LoaderDataset(two_crops, np.arange(10), rows_per_id=np.int64(2), batch_size=4)
    assert ds.rows_per_id == 2 and type(ds.rows_per_id) is int
    assert ds[0].shape == (8, 1)
