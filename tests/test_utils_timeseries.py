"""`timeseries_dataset_from_array` against Keras's own (issue 15).

Keras's `format="grain"` dataset is the reference: the same windows and
targets for the same arguments, in the same order without shuffling, and
the same set of windows with it.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

from keras_oom import (
    LoaderDataset,
    PrefetchLoaderDataset,
    timeseries_dataset_from_array,
)


def _keras(data, targets, **kwargs):
    pytest.importorskip("grain")
    ds = keras.utils.timeseries_dataset_from_array(
        data, targets, format="grain", **kwargs
    )
    out = []
    for b in ds:
        out.append(
            tuple(np.asarray(p) for p in b)
            if isinstance(b, tuple)
            else (np.asarray(b),)
        )
    return out


def _ours(data, targets, **kwargs):
    ds = timeseries_dataset_from_array(data, targets, **kwargs)
    out = [ds[i] for i in range(len(ds))]
    return [b if isinstance(b, tuple) else (b,) for b in out]


DATA = np.arange(200, dtype=np.float32).reshape(100, 2) * np.float32(0.5)
TARGETS = np.arange(100, dtype=np.int64) * 3

CASES = [
    dict(sequence_length=5),
    dict(sequence_length=4, sequence_stride=3, sampling_rate=2, batch_size=7),
    dict(sequence_length=3, start_index=10, end_index=60, batch_size=16),
    dict(sequence_length=6, sampling_rate=3, start_index=5, batch_size=32),
    dict(sequence_length=2, sequence_stride=5, end_index=90, batch_size=3),
]


@pytest.mark.parametrize("with_targets", [True, False])
@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(map(str, k.values())))
def test_windows_and_targets_equal_keras_in_order(kwargs, with_targets):
    """Kind windows: the same batches, dtypes and shapes as Keras's, unshuffled."""
    targets = TARGETS if with_targets else None
    ref = _keras(DATA, targets, **kwargs)
    ours = _ours(DATA, targets, **kwargs)
    assert len(ours) == len(ref)
    for mine, theirs in zip(ours, ref, strict=True):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            assert a.shape == b.shape
            # Keras's grain batches go through the backend: JAX (without
            # x64) narrows int64 to int32. keras-oom keeps the array's dtype,
            # as Keras's format="tf" does.
            assert a.dtype == b.dtype or (a.dtype, b.dtype) == (np.int64, np.int32)
            np.testing.assert_array_equal(a, b)


def test_shuffled_windows_are_keras_windows_reshuffled_per_epoch():
    """Kind shuffle: Keras's windows; a new order each epoch, fixed by seed."""
    kwargs = dict(
        sequence_length=4, sequence_stride=2, batch_size=8, seed=3, shuffle=True
    )
    ref = _keras(DATA, TARGETS, **kwargs)
    ds = timeseries_dataset_from_array(DATA, TARGETS, **kwargs)
    again = timeseries_dataset_from_array(DATA, TARGETS, **kwargs)

    def pairs(batches):
        return sorted(
            (tuple(x.ravel()), int(y)) for b in batches for x, y in zip(*b, strict=True)
        )

    first = [ds[i] for i in range(len(ds))]
    assert pairs(first) == pairs(ref)
    # Keras's own once-shuffled start positions are the sample ids.
    starts = np.arange(0, 97, 2)
    np.random.RandomState(3).shuffle(starts)
    assert ds.sample_ids.tolist() == starts.tolist()
    ds.on_epoch_end()
    second = [ds[i] for i in range(len(ds))]
    assert pairs(second) == pairs(ref)
    assert [b[1].tolist() for b in first] != [b[1].tolist() for b in second]
    assert [again[i][1].tolist() for i in range(len(again))] == [
        b[1].tolist() for b in first
    ]


def test_batch_size_none_yields_single_windows():
    """Kind batching: batch_size=None gives (window, target) without batch axis."""
    ds = timeseries_dataset_from_array(
        DATA, TARGETS, sequence_length=3, batch_size=None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a single window has no rows to check
        x, y = ds[4]
    assert x.shape == (3, 2) and y.shape == ()
    np.testing.assert_array_equal(x, DATA[4:7])
    assert int(y) == TARGETS[4]


def test_a_memmap_is_read_window_by_window(tmp_path):
    """Kind memory: a np.memmap stays on disk; batches are gathers from it."""
    mm = np.lib.format.open_memmap(
        tmp_path / "d.npy", mode="w+", dtype=np.float32, shape=DATA.shape
    )
    mm[:] = DATA
    ds = timeseries_dataset_from_array(mm, None, sequence_length=4, batch_size=5)
    np.testing.assert_array_equal(ds[1][0], DATA[5:9])
    assert type(ds[1]) is np.ndarray


@pytest.mark.timeout(60)
def test_num_workers_gives_the_same_batches():
    """Kind num_workers: 0 (default) is a LoaderDataset; 2 workers agree."""
    kwargs = dict(sequence_length=5, batch_size=10, shuffle=True, seed=1)
    plain = timeseries_dataset_from_array(DATA, TARGETS, **kwargs)
    assert isinstance(plain, LoaderDataset)
    assert not isinstance(plain, PrefetchLoaderDataset)
    with timeseries_dataset_from_array(
        DATA, TARGETS, num_workers=2, **kwargs
    ) as pooled:
        for i in range(len(plain)):
            for a, b in zip(plain[i], pooled[i], strict=True):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(start_index=-1),
        dict(start_index=100),
        dict(start_index=10, end_index=5),
        dict(end_index=100),
        dict(end_index=-3),
        dict(sampling_rate=0),
        dict(sampling_rate=100),
        dict(sequence_stride=0),
        dict(sequence_stride=100),
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
def test_bad_arguments_raise_keras_errors(kwargs):
    """Kind bad input: the same ValueError and message as Keras's."""
    with pytest.raises(ValueError) as theirs:
        keras.utils.timeseries_dataset_from_array(
            DATA, TARGETS, 3, format="grain", **kwargs
        )
    with pytest.raises(ValueError) as mine:
        timeseries_dataset_from_array(DATA, TARGETS, 3, **kwargs)
    assert str(mine.value) == str(theirs.value)


def test_no_window_fits_raises_naming_sequence_length():
    """Kind bad input: windows longer than the data are a clear ValueError."""
    with pytest.raises(ValueError, match="sequence_length=200"):
        timeseries_dataset_from_array(DATA, None, sequence_length=200)
