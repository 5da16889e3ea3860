"""PrefetchLoaderDataset: same batches as LoaderDataset, the pool, arguments.

The central promise is that prefetching is invisible: for every index, in
any request order and for any `num_workers`, `ds[i]` equals what
`LoaderDataset` returns. The rest checks the class itself: a fixed pool
reused across epochs, `num_workers` reduced to the batches of an epoch,
its arguments, copies and subclasses. What the engine decides (the window
loaded ahead, re-reads, request order): test_engine.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import _procs
import numpy as np
import pytest
from _batches import assert_batches_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_oom
from keras_oom import LoaderDataset, PrefetchLoaderDataset

pytestmark = pytest.mark.timeout(60)


# -- equivalence --------------------------------------------------------------


@st.composite
def configs(draw):
    n = draw(st.integers(1, 30))
    batch_size = draw(st.integers(1, n))
    cfg = {
        "num_workers": draw(st.integers(1, 3)),
        "batch_size": batch_size,
        "shuffle": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "drop_remainder": draw(st.booleans()),
        "repeat": draw(st.booleans()),
    }
    labels = draw(st.sampled_from(["none", "array", "dict"]))
    per_epoch = n // batch_size if cfg["drop_remainder"] else -(-n // batch_size)
    span = per_epoch * (3 if cfg["repeat"] else 1)
    index = st.integers(0, span - 1)
    orders = [
        draw(
            st.one_of(
                st.permutations(list(range(span))),
                st.lists(index, min_size=1, max_size=2 * span + 2),
            )
        )
        for _ in range(2)
    ]
    return n, cfg, labels, orders


@pytest.mark.timeout(150)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(configs())
def test_same_batches_as_loader_dataset(example):
    n, cfg, label_kind, orders = example
    ids = np.arange(100, 100 + n)
    labels = {
        "none": None,
        "array": np.arange(n) * 3,
        "dict": {"a": np.arange(n) * 3, "b": np.arange(n).astype(np.float32)},
    }[label_kind]
    plain_cfg = {k: v for k, v in cfg.items() if k != "num_workers"}
    reference = LoaderDataset(_procs.ids_loader, ids, labels, **plain_cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reduction, order
        ds = PrefetchLoaderDataset(_procs.ids_loader, ids, labels, **cfg)
        with ds:
            for order in orders:
                for i in order:
                    assert_batches_equal(ds[i], reference[i])
                    np.testing.assert_array_equal(
                        ds.batch_ids(i), reference.batch_ids(i)
                    )
                ds.on_epoch_end()
                reference.on_epoch_end()
            pids = ds.worker_pids
    assert _procs.wait_gone(pids) == []


def test_is_a_loader_dataset_with_keras_parallelism_off():
    with PrefetchLoaderDataset(_procs.ids_loader, np.arange(8), batch_size=2) as ds:
        assert isinstance(ds, LoaderDataset)
        assert ds.workers == 1
        assert ds.use_multiprocessing is False
        assert ds.num_workers == 2
        assert len(ds.worker_pids) == 2
        assert keras_oom.PrefetchLoaderDataset is PrefetchLoaderDataset


@pytest.mark.parametrize("num_workers", [1, 3])
def test_random_access_in_every_epoch(num_workers):
    ids = np.arange(40)
    reference = LoaderDataset(
        _procs.ids_loader, ids, ids % 5, batch_size=3, shuffle=True, seed=7
    )
    rng = np.random.default_rng(0)
    with (
        warnings.catch_warnings(),
        PrefetchLoaderDataset(
            _procs.ids_loader,
            ids,
            ids % 5,
            batch_size=3,
            shuffle=True,
            seed=7,
            num_workers=num_workers,
        ) as ds,
    ):
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(3):
            for i in [*rng.permutation(len(ds)), -1, 0, 0, len(ds) - 1, 5]:
                assert_batches_equal(ds[int(i)], reference[int(i)])
            ds.on_epoch_end()
            reference.on_epoch_end()
        with pytest.raises(IndexError):
            ds[len(ds)]


def test_set_epoch_matches_loader_dataset():
    ids = np.arange(20)
    kw = {"batch_size": 4, "shuffle": True, "seed": 3}
    reference = LoaderDataset(_procs.ids_loader, ids, **kw)
    with PrefetchLoaderDataset(_procs.ids_loader, ids, **kw) as ds:
        for epoch in (5, 2, 2, 0):
            ds.set_epoch(epoch)
            reference.set_epoch(epoch)
            for i in range(len(ds)):
                assert_batches_equal(ds[i], reference[i])


def test_mutating_a_batch_does_not_change_a_later_read():
    """Re-reading a batch gives the loader's data, as LoaderDataset does."""
    with PrefetchLoaderDataset(
        _procs.big_loader, np.arange(64), batch_size=16, num_workers=1
    ) as ds:
        first = ds[0]
        want = first.copy()
        first[:] = -1  # e.g. in-place normalisation by the caller
        np.testing.assert_array_equal(ds[1][:, 0], np.arange(16, 32))
        np.testing.assert_array_equal(ds[0], want)


# -- the pool -------------------------------------------------------------------


def test_workers_are_reused_across_epochs():
    ids = np.arange(24)
    with PrefetchLoaderDataset(
        _procs.ids_loader, ids, batch_size=4, num_workers=2, shuffle=True, seed=1
    ) as ds:
        pids = ds.worker_pids
        assert len(set(pids)) == 2
        assert all(_procs.alive(p) for p in pids)
        for _ in range(4):
            for i in range(len(ds)):
                ds[i]
            ds.on_epoch_end()
            assert ds.worker_pids == pids
        stats = ds.stats()
        assert stats["batches"] == 4 * len(ds)
        assert {w["pid"] for w in stats["workers"]} == set(pids)
        # Both workers did share the work: the pool is really used.
        assert all(w["batches"] > 0 for w in stats["workers"])
    assert _procs.wait_gone(pids) == []


def test_workers_beyond_the_batches_per_epoch_are_reduced_with_a_warning():
    with pytest.warns(UserWarning, match="num_workers reduced from 4 to 3"):
        ds = PrefetchLoaderDataset(
            _procs.ids_loader, np.arange(10), batch_size=4, num_workers=4
        )
    with ds:
        assert ds.num_workers == 3
        assert len(ds.worker_pids) == 3
        assert [len(ds[i]["n"]) for i in range(len(ds))] == [4, 4, 2]


def test_a_short_last_batch_counts_for_the_worker_reduction():
    """100 samples at batch size 64 are 2 batches: 2 workers are not too many."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = PrefetchLoaderDataset(
            _procs.ids_loader, np.arange(100), batch_size=64, num_workers=2
        )
    with ds:
        assert ds.num_workers == 2
        assert len(ds.worker_pids) == 2
        assert [len(ds[i]["n"]) for i in range(len(ds))] == [64, 36]


def test_enough_samples_means_no_reduction():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with PrefetchLoaderDataset(
            _procs.ids_loader, np.arange(12), batch_size=4, num_workers=3
        ) as ds:
            assert ds.num_workers == 3
            assert len(ds.worker_pids) == 3


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"num_workers": 0}, ValueError),
        ({"num_workers": 1.5}, TypeError),
        ({"timeout": 0}, ValueError),
        ({"timeout": "1"}, TypeError),
        ({"start_method": "thread"}, ValueError),
    ],
)
def test_bad_arguments_start_no_workers(kwargs, error):
    before = _procs.worker_descendants()
    with pytest.raises(error):
        PrefetchLoaderDataset(_procs.ids_loader, np.arange(8), batch_size=2, **kwargs)
    assert _procs.worker_descendants() - before == set()


# -- stats() (its verdicts: tests/test_stats.py) ------------------------------


def test_stats_report_cpu_share_and_a_diagnosis_also_after_close():
    with PrefetchLoaderDataset(
        _procs.ids_loader, np.arange(40), batch_size=4, num_workers=2
    ) as ds:
        for i in range(len(ds)):
            ds[i]
        during = ds.stats()
    after = ds.stats()
    assert 0.0 <= during["cpu_share"] <= 1.0
    assert isinstance(during["diagnosis"], str) and during["diagnosis"]
    assert after["batches"] == during["batches"] == 10
    assert [w["index"] for w in after["workers"]] == [0, 1]
    with pytest.raises(keras_oom.DatasetClosedError):
        ds[0]


# -- the dataset as users build and copy it (issues 8 and 10) -----------------


class Scaled(PrefetchLoaderDataset):
    """The documented subclass pattern: attributes set after super().__init__."""

    def __init__(self, sample_ids, factor, **kwargs):
        super().__init__(sample_ids=sample_ids, **kwargs)
        self.factor = factor

    def load(self, ids):
        return np.asarray(ids) * self.factor


def test_subclass_setting_attributes_after_super_init_works():
    with Scaled(np.arange(6), 10, batch_size=2, num_workers=2) as ds:
        got = [ds[i].tolist() for i in range(len(ds))]
    assert got == [[0, 10], [20, 30], [40, 50]]


class Unpicklable:
    """A label that refuses to be pickled, to prove labels stay home."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        raise RuntimeError("a label was pickled for a worker")


@pytest.mark.timeout(90)
def test_subclass_overriding_load_does_not_ship_labels_to_workers():
    labels = np.empty(6, dtype=object)
    labels[:] = [Unpicklable(i) for i in range(6)]
    with Scaled(
        np.arange(6),
        3,
        labels=labels,
        batch_size=2,
        num_workers=2,
        start_method="subprocess",  # pickles what workers get
    ) as ds:
        x, y = ds[1]
    assert x.tolist() == [6, 9]
    assert [label.value for label in y] == [2, 3]


@pytest.mark.parametrize(
    "timeout", [float("inf"), 1e9, np.int64(5), np.float32(5)], ids=repr
)
def test_timeout_accepts_any_positive_number_of_seconds(timeout):
    ids = np.arange(8)
    with PrefetchLoaderDataset(
        _procs.ids_loader, ids, batch_size=2, num_workers=2, timeout=timeout
    ) as ds:
        for i in range(len(ds)):
            assert_batches_equal(ds[i], _procs.ids_loader(ids[2 * i : 2 * i + 2]))


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (float("nan"), ValueError),
        ("5", TypeError),
        (True, TypeError),
    ],
    ids=repr,
)
def test_timeout_rejects_what_is_not_a_positive_number(timeout, error):
    with pytest.raises(error, match="timeout"):
        PrefetchLoaderDataset(
            _procs.ids_loader, np.arange(8), batch_size=2, timeout=timeout
        )


@pytest.mark.parametrize("how", ["copy", "pickle"])
def test_copy_of_an_open_dataset_is_a_working_dataset_of_its_own(how):
    import copy
    import pickle

    ids = np.arange(12)
    with PrefetchLoaderDataset(
        _procs.ids_loader, ids, batch_size=3, num_workers=2, shuffle=True, seed=4
    ) as ds:
        first = ds[0]
        twin = copy.copy(ds) if how == "copy" else pickle.loads(pickle.dumps(ds))
        assert not twin.closed
        try:
            assert_batches_equal(twin[0], first)
            for i in range(1, len(ds)):
                assert_batches_equal(twin[i], ds[i])
            own = set(twin.worker_pids)
            assert own.isdisjoint(ds.worker_pids)
        finally:
            twin.close()
        assert twin.closed
        assert _procs.wait_gone(own) == []
        # The original keeps its workers and its batches.
        assert not ds.closed
        ds.on_epoch_end()
        assert len(ds.worker_pids) == 2
        ds[0]


def test_stats_after_close_report_the_final_numbers():
    with PrefetchLoaderDataset(
        _procs.ids_loader, np.arange(8), batch_size=2, num_workers=2
    ) as ds:
        for i in range(len(ds)):
            ds[i]
    stats = ds.stats()
    assert stats["batches"] == 4
    assert len(stats["workers"]) == 2


def _failing_line() -> int:
    source = Path(_procs.__file__).read_text().splitlines()
    (line,) = [
        n
        for n, text in enumerate(source, 1)
        if "# FAILING_LINE" in text and text.lstrip().startswith("raise")
    ]
    return line


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_loader_error_notes_name_the_loaders_file_and_line(start_method):
    with (
        PrefetchLoaderDataset(
            _procs.failing_line_loader,
            np.arange(6),
            batch_size=2,
            num_workers=2,
            start_method=start_method,
        ) as ds,
        pytest.raises(OSError, match="Truncated") as info,
    ):
        ds[1]
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "_procs.py" in notes, notes
    assert f"line {_failing_line()}" in notes, notes
    assert "failing_line_loader" in notes, notes
    assert "ids [2, 3]" in notes, notes  # and the batch's ids


@pytest.mark.timeout(120)
def test_sample_weights_reach_fit():
    import keras

    ids = np.arange(16)
    targets = np.ones((16, 1), np.float32)

    def train(weights):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        with PrefetchLoaderDataset(
            _procs.features_loader,
            ids,
            targets,
            sample_weights=weights,
            batch_size=4,
            num_workers=2,
        ) as ds:
            x, y, w = ds[0]
            np.testing.assert_array_equal(w, weights[:4])
            history = model.fit(ds, epochs=2, shuffle=False, verbose=0)
        return history.history["loss"]

    # Zero weights make the weighted loss zero; ones do not.
    assert train(np.zeros(16, np.float32)) == [0.0, 0.0]
    assert min(train(np.ones(16, np.float32))) > 0
