"""Which `sample_ids` a dataset accepts, and how it refuses the rest.

Kept apart from `test_dataset.py` so that it tests `_as_sample_ids` through
the public constructor only; the messages must name `sample_ids` and show
what was received.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from keras_oom import LoaderDataset


def identity(ids):
    return ids


@pytest.mark.parametrize(
    ("ids", "shown"),
    [
        ([[1, 2], [3]], r"\[\[1, 2\], \[3\]\]"),
        ([(1, 2), (3,)], r"\[\(1, 2\), \(3,\)\]"),
        ([1, [2, 3]], r"\[1, \[2, 3\]\]"),
        ([np.arange(2), np.arange(3)], r"array\(\[0, 1\]\)"),
    ],
    ids=["lists", "tuples", "scalar-and-list", "arrays"],
)
def test_ragged_sample_ids_are_refused_by_name(ids, shown):
    match = r"`sample_ids`.*Received: sample_ids="
    with pytest.raises(ValueError, match=match) as info:
        LoaderDataset(identity, ids, batch_size=1)
    assert re.search(shown, str(info.value)), str(info.value)
    assert "inhomogeneous" not in str(info.value)  # not numpy's own words


@pytest.mark.parametrize(
    "ids",
    [
        np.array([[1, 2], [3]], dtype=object),
        np.array([(1, 2), (3, 4, 5)], dtype=object),
        [(1, 2), "a"],
    ],
    ids=["object-array-of-lists", "object-array-of-tuples", "tuple-and-str"],
)
def test_sequences_as_sample_ids_are_refused(ids):
    """An object array of sequences is 1-D for numpy, but not one id per sample."""
    with pytest.raises(
        ValueError, match=r"`sample_ids`.*one scalar.*Received: sample_ids="
    ):
        LoaderDataset(identity, ids, batch_size=1)


@pytest.mark.parametrize(
    ("ids", "shown"),
    [
        ("abc", r"sample_ids='abc'"),
        (7, r"sample_ids=7"),
        ({1, 2}, r"sample_ids=\{1, 2\}"),
        (np.zeros((2, 3)), r"shape \(2, 3\)"),
    ],
    ids=["str", "int", "set", "2-D"],
)
def test_non_1d_sample_ids_show_what_was_received(ids, shown):
    with pytest.raises(ValueError, match=r"`sample_ids` must be 1-D") as info:
        LoaderDataset(identity, ids, batch_size=1)
    assert re.search(shown, str(info.value)), str(info.value)


def test_long_sample_ids_are_shown_shortened():
    ids = [[i, i + 1] for i in range(10_000)] + [[0]]
    with pytest.raises(ValueError, match=r"`sample_ids`") as info:
        LoaderDataset(identity, ids, batch_size=1)
    assert len(str(info.value)) < 500


@pytest.mark.parametrize(
    "ids",
    [
        ["a", "b", "c"],
        [Path("a.npy"), Path("b.npy"), Path("c.npy")],
        [3, 1, 2],
        np.arange(3),
        np.array(["x", "y", "z"]),
        range(3),
        (np.int64(1), np.int64(2), np.int64(3)),
    ],
    ids=["str", "path", "int", "ndarray", "str-ndarray", "range", "np-int"],
)
def test_scalar_sample_ids_are_accepted(ids):
    ds = LoaderDataset(identity, ids, batch_size=2)
    assert ds.sample_ids.shape == (3,)
    assert list(ds.sample_ids) == list(ids)
