"""The engine (engine.py's `Prefetcher`) seen through `PrefetchLoaderDataset`.

What the engine decides, checked against real workers: a window of
`num_workers` batches loaded ahead, also across the epoch boundary; batches
ready when asked for counted as hits; re-reads of an epoch's first batches
served from copies, once per epoch; and a warning, once, for request orders
that defeat the read-ahead, without false alarms for Keras's own access
pattern. The state machine that drives the real `Prefetcher` over a fake
executor: test_schedule.py.
"""

from __future__ import annotations

import functools
import time
import warnings

import _procs
import numpy as np
import pytest
from _batches import assert_batches_equal

from keras_oom import LoaderDataset, PrefetchLoaderDataset

pytestmark = pytest.mark.timeout(60)


def order_warnings(record):
    return [w for w in record if "out of order" in str(w.message)]


# -- the window of batches loaded ahead -------------------------------------------


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


# -- re-reads of an epoch's first batches ---------------------------------------


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
