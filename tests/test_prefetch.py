"""PrefetchLoaderDataset: same batches as LoaderDataset, pool reuse, order.

The central promise is that prefetching is invisible: for every index, in
any request order and for any `num_workers`, `ds[i]` equals what
`LoaderDataset` returns. The rest checks what makes it fast (a fixed pool
reused across epochs, a window of `num_workers` batches loaded ahead, also
across the epoch boundary) and that it nudges users away from request
orders that defeat the prefetch, without false alarms for Keras's own
access pattern.
"""

from __future__ import annotations

import functools
import time
import warnings
from pathlib import Path

import _procs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_oom
from keras_oom import LoaderDataset, PrefetchLoaderDataset

pytestmark = pytest.mark.timeout(60)


def assert_batches_equal(got, want):
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_batches_equal(g, w)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for k in want:
            assert_batches_equal(got[k], want[k])
    else:
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def order_warnings(record):
    return [w for w in record if "out of order" in str(w.message)]


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


def wait_for_log(path, count, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _procs.read_log(path)
        if len(lines) >= count:
            return lines
        time.sleep(0.02)
    return _procs.read_log(path)


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_prefetch_window_is_num_workers_batches(tmp_path, num_workers):
    """Each worker holds at most one batch: exactly num_workers load ahead."""
    log = tmp_path / "log"
    loader = functools.partial(_procs.logging_loader, path=str(log))
    ids = np.arange(40)
    with PrefetchLoaderDataset(
        loader, ids, batch_size=4, num_workers=num_workers
    ) as ds:
        np.testing.assert_array_equal(ds[0], ids[:4] * 2)
        # Workers load only what the engine sent them, and it sends nothing
        # between calls: what it has sent now is all that will be loaded.
        schedule = ds._engine.schedule
        sent = sorted([*schedule.held().values(), *schedule.arrived_keys()])
        assert sent == [(0, i) for i in range(1, num_workers + 1)]
        lines = wait_for_log(log, num_workers + 1)
        loaded = sorted(line[0] // 4 for line in lines)
        assert loaded == list(range(num_workers + 1))
        # The batches ahead are served without loading again.
        for i in range(1, num_workers + 1):
            np.testing.assert_array_equal(ds[i], ids[4 * i : 4 * i + 4] * 2)
        assert ds.stats()["hits"] >= num_workers - 1


def test_prefetches_across_the_epoch_boundary(tmp_path):
    log = tmp_path / "log"
    loader = functools.partial(_procs.logging_loader, path=str(log))
    ids = np.arange(12)
    kw = {"batch_size": 4, "shuffle": True, "seed": 11}
    reference = LoaderDataset(loader, ids, **kw)
    reference.on_epoch_end()
    next_epoch_first = sorted(reference.batch_ids(0).tolist())
    with PrefetchLoaderDataset(loader, ids, num_workers=2, **kw) as ds:
        for i in range(len(ds)):
            ds[i]
        # Before on_epoch_end, the next epoch's first batch is being loaded.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(sorted(line) == next_epoch_first for line in _procs.read_log(log)):
                break
            time.sleep(0.02)
        assert any(sorted(line) == next_epoch_first for line in _procs.read_log(log))
        ds.on_epoch_end()
        np.testing.assert_array_equal(ds[0], reference.batch_ids(0) * 2)
        # Served from the prefetch: that batch was loaded once, and is not
        # being loaded again (nothing is sent between calls).
        assert (1, 0) not in ds._engine.schedule.held().values()
        lines = _procs.read_log(log)
        assert [sorted(line) for line in lines].count(next_epoch_first) == 1


def test_every_epoch_runs_the_loader_again_also_unshuffled_with_two_batches(
    tmp_path,
):
    """Issue 8.5: with at most 2 batches per epoch, the re-read cache served
    epoch 0's copies forever, so the loader (and its augmentation) never ran
    again. A later epoch must load its own batches."""
    log = tmp_path / "log"
    loader = functools.partial(_procs.logging_loader, path=str(log))
    with PrefetchLoaderDataset(loader, np.arange(8), batch_size=4) as ds:
        for _ in range(4):
            for i in range(len(ds)):
                np.testing.assert_array_equal(ds[i], np.arange(4 * i, 4 * i + 4) * 2)
            ds.on_epoch_end()
        stats = ds.stats()
    loads = [line[0] // 4 for line in _procs.read_log(log)]
    # Each of the 4 epochs loaded batches 0 and 1 (plus what was read ahead).
    assert loads.count(0) >= 4 and loads.count(1) >= 4, loads
    assert stats["batches"] == 8


def test_rereads_of_the_first_batches_are_served_once_per_epoch(tmp_path):
    """TensorFlow reads batches 0 and 1 twice; the copies kept for that are
    bounded: at most 2 batches, of the current epoch only."""
    log = tmp_path / "log"
    loader = functools.partial(_procs.logging_loader, path=str(log))
    with PrefetchLoaderDataset(
        loader, np.arange(8), batch_size=4, shuffle=True, seed=3
    ) as ds:
        for _ in range(5):
            first = [ds[0], ds[1]]
            np.testing.assert_array_equal(ds[0], first[0])  # a re-read
            np.testing.assert_array_equal(ds[1], first[1])
            assert len(ds._engine.cache) <= 2
            ds.on_epoch_end()
        ds[0]
        assert len(ds._engine.cache) == 1  # the old epoch's copies are gone
    loads = [tuple(sorted(line)) for line in _procs.read_log(log)]
    # The re-reads did not load again: no batch was loaded twice.
    assert len(loads) == len(set(loads)), loads
    assert ds.stats()["batches"] == 21


def test_stats_count_batches_loaded_ahead_as_hits():
    """A step slower than the loader finds every batch ready: all are hits."""
    with PrefetchLoaderDataset(
        _procs.ids_loader, np.arange(40), batch_size=4, num_workers=2
    ) as ds:
        for i in range(len(ds)):
            time.sleep(0.1)  # a training step much slower than the loader
            ds[i]
        stats = ds.stats()
    assert stats["batches"] == 10
    assert stats["hits"] >= 9, stats


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


# -- request order ----------------------------------------------------------------


def test_out_of_order_requests_warn_once():
    ids = np.arange(64)
    with (
        warnings.catch_warnings(record=True) as record,
        PrefetchLoaderDataset(_procs.ids_loader, ids, batch_size=4) as ds,
    ):
        warnings.simplefilter("always")
        order = np.random.default_rng(1).permutation(len(ds))
        for _ in range(3):
            for i in order:
                ds[int(i)]
            ds.on_epoch_end()
    found = order_warnings(record)
    assert len(found) == 1
    assert issubclass(found[0].category, UserWarning)
    assert "shuffle=False" in str(found[0].message)


def test_in_order_reading_does_not_warn():
    with (
        warnings.catch_warnings(record=True) as record,
        PrefetchLoaderDataset(_procs.ids_loader, np.arange(30), batch_size=4) as ds,
    ):
        warnings.simplefilter("always")
        for _ in range(3):
            for i in range(len(ds)):
                ds[i]
            ds.on_epoch_end()
        ds[0]
        ds[0]  # a repeated request is not out of order
    assert order_warnings(record) == []


def test_repeat_in_order_does_not_warn():
    with (
        warnings.catch_warnings(record=True) as record,
        PrefetchLoaderDataset(
            _procs.ids_loader, np.arange(10), batch_size=3, repeat=True, shuffle=True
        ) as ds,
    ):
        warnings.simplefilter("always")
        reference = LoaderDataset(
            _procs.ids_loader, np.arange(10), batch_size=3, repeat=True,
            shuffle=True, seed=ds.seed,
        )  # fmt: skip
        for i in range(4 * ds.batches_per_epoch):
            assert_batches_equal(ds[i], reference[i])
    assert order_warnings(record) == []


def test_keras_jax_trainer_pattern_does_not_warn():
    """Keras's JAX trainer peeks at batch 0, ends the epoch, then iterates."""
    ids = np.arange(30)
    reference = LoaderDataset(
        _procs.ids_loader, ids, batch_size=4, shuffle=True, seed=5
    )
    with (
        warnings.catch_warnings(record=True) as record,
        PrefetchLoaderDataset(
            _procs.ids_loader, ids, batch_size=4, shuffle=True, seed=5
        ) as ds,
    ):
        warnings.simplefilter("always")
        assert_batches_equal(ds[0], reference[0])
        ds.on_epoch_end()
        reference.on_epoch_end()
        for _ in range(2):
            for i in range(len(ds)):
                assert_batches_equal(ds[i], reference[i])
            ds.on_epoch_end()
            reference.on_epoch_end()
    assert order_warnings(record) == []


def test_one_peek_does_not_warn():
    with (
        warnings.catch_warnings(record=True) as record,
        PrefetchLoaderDataset(_procs.ids_loader, np.arange(40), batch_size=4) as ds,
    ):
        warnings.simplefilter("always")
        ds[0]
        ds[5]  # a single jump, e.g. a user peeking at one batch
        ds.on_epoch_end()
        for i in range(len(ds)):
            ds[i]
    assert order_warnings(record) == []


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
