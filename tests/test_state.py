"""Issue 14, Kind E item 9: state changed between epochs reaches the workers.

A subclass that changes its own state in `on_epoch_end` (a curriculum:
`self.level += 1`, read by `load`) got levels 0, 1, 2 from `LoaderDataset`
and 0, 0, 0 from `PrefetchLoaderDataset`, silently: workers load with a
copy of the dataset made when they started. Now, at the first read after
an epoch boundary (`on_epoch_begin`, `on_epoch_end`, `set_epoch`), the
dataset compares the loader's state with what the workers have; what
changed travels with the next request to each worker, batches loaded
before the change are loaded again, and state that cannot be pickled is a
clear error. The same holds for a callable loader object's attributes and
for `self.epoch` read in `load`.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import warnings

import _state_loaders as sl
import keras
import numpy as np
import pytest

from keras_oom import LoaderDataset, PrefetchLoaderDataset, SyncEpoch

pytestmark = pytest.mark.timeout(90)

IDS = np.arange(12)
METHODS = ["fork", "subprocess", "spawn", "forkserver"]


def epochs_of(ds, epochs):
    """Reads every batch of `epochs` epochs in order, as Keras's fit does."""
    out = []
    for _ in range(epochs):
        ds.on_epoch_begin()
        out.append([ds[i].tolist() for i in range(len(ds))])
        ds.on_epoch_end()
    return out


def levels(batches):
    return sorted({row[1] for batch in batches for row in batch})


@pytest.mark.parametrize("after", [True, False], ids=["after-super", "before-super"])
@pytest.mark.parametrize("start_method", METHODS)
def test_curriculum_level_reaches_the_workers(start_method, after):
    """Kind E: levels 0, 1, 2 over three epochs, as LoaderDataset gives,
    whether on_epoch_end changes the level before or after the base's."""
    cfg = {"batch_size": 4, "shuffle": True, "seed": 0, "after": after}
    want = epochs_of(sl.PlainCurriculum(sample_ids=IDS, **cfg), 3)
    with sl.PrefetchCurriculum(
        sample_ids=IDS, num_workers=2, start_method=start_method, **cfg
    ) as ds:
        got = epochs_of(ds, 3)
    assert [levels(e) for e in want] == [[0], [1], [2]]
    assert got == want


@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_a_callable_loaders_attribute_reaches_the_workers(start_method):
    """Kind E: the same for a loader object whose attribute the user sets."""
    plain_loader, loader = sl.LevelLoader(), sl.LevelLoader()
    plain = LoaderDataset(plain_loader, IDS, batch_size=4)
    want, got = [], []
    with PrefetchLoaderDataset(
        loader, IDS, batch_size=4, num_workers=2, start_method=start_method
    ) as ds:
        for level in range(3):
            plain_loader.level = loader.level = level * 10
            want += epochs_of(plain, 1)
            got += epochs_of(ds, 1)
    assert [levels(e) for e in want] == [[0], [10], [20]]
    assert got == want


def test_a_closure_variable_reaches_the_workers():
    """Kind E: a loader function's closure is state too (`nonlocal`)."""

    def make():
        level = 0

        def loader(ids):
            return sl.tagged(ids, level)

        def bump():
            nonlocal level
            level += 1

        return loader, bump

    loader, bump = make()
    with PrefetchLoaderDataset(
        loader, IDS, batch_size=4, num_workers=2, start_method="subprocess"
    ) as ds:
        first = epochs_of(ds, 1)
        bump()
        second = epochs_of(ds, 1)
    assert levels(first[0]) == [0] and levels(second[0]) == [1]


@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_self_epoch_in_load_follows_set_epoch(start_method):
    """Kind E: a `load` that reads `self.epoch` sees what LoaderDataset's
    does, also after `set_epoch` (SyncEpoch's way in) and mid-epoch starts."""
    plain = sl.PlainEpochAware(sample_ids=IDS, batch_size=4, shuffle=True, seed=1)
    with sl.PrefetchEpochAware(
        sample_ids=IDS,
        batch_size=4,
        shuffle=True,
        seed=1,
        num_workers=2,
        start_method=start_method,
    ) as ds:
        assert epochs_of(ds, 2) == epochs_of(plain, 2)
        for d in (plain, ds):
            d.set_epoch(7)
        assert epochs_of(ds, 1) == epochs_of(plain, 1)
        for d in (plain, ds):
            d.set_epoch(3, 1)
        assert [ds[i].tolist() for i in range(3)] == [
            plain[i].tolist() for i in range(3)
        ]


def test_a_change_that_cannot_be_pickled_is_a_clear_error():
    """Kind E: state that cannot reach the workers must not leave them stale
    in silence: the read raises, naming the attribute."""
    with sl.PrefetchLocking(
        sample_ids=IDS, batch_size=4, num_workers=2, start_method="fork"
    ) as ds:
        epochs_of(ds, 1)  # on_epoch_end sets self.guard = threading.Lock()
        with pytest.raises(TypeError, match=r"guard") as info:
            ds[0]
    assert "pickle" in str(info.value)


def test_stats_count_the_batches_loaded_again():
    """The batches loaded ahead with the old state are discarded, not served."""
    with sl.PrefetchCurriculum(
        sample_ids=IDS, batch_size=2, num_workers=3, start_method="fork"
    ) as ds:
        epochs_of(ds, 2)
        stats = ds.stats()
    assert stats["discarded"] >= 1


class Recorded:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        self.seen.append(np.asarray(x).tolist())
        return x, y


class PlainRecorded(Recorded, sl.PlainCurriculum):
    pass


class PrefetchRecorded(Recorded, sl.PrefetchCurriculum):
    pass


def run_fit(cls, **extra):
    ds = cls(
        sample_ids=IDS, labels=IDS * 1.0, batch_size=4, shuffle=True, seed=2, **extra
    )
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, epochs=3, shuffle=False, verbose=0, callbacks=[SyncEpoch(ds)])
    if isinstance(ds, PrefetchLoaderDataset):
        ds.close()
    return ds.seen


def test_fit_reads_the_same_curriculum_batches_in_both_classes():
    """Kind E: in a real fit (build peek, reset, SyncEpoch), the batches
    of every epoch carry the level LoaderDataset gives them."""
    want = run_fit(PlainRecorded)
    got = run_fit(PrefetchRecorded, num_workers=2)
    assert len({row[1] for batch in want for row in batch}) >= 3
    assert got == want


@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_a_replacement_worker_gets_the_changed_state(start_method):
    """Kind E: a worker started after the change (replacing a dead one)
    begins from the state the pool started with; it must get the change."""
    import signal

    import _procs

    from keras_oom import WorkerDiedError

    cfg = {"batch_size": 2, "shuffle": True, "seed": 3}
    plain = sl.PlainCurriculum(sample_ids=IDS, **cfg)
    want = epochs_of(plain, 2)
    with sl.PrefetchCurriculum(
        sample_ids=IDS, num_workers=2, start_method=start_method, **cfg
    ) as ds:
        assert epochs_of(ds, 1) == want[:1]
        ds.on_epoch_begin()
        got = [ds[0].tolist()]  # the level-1 state has reached both workers
        victim = ds.worker_pids[0]
        os.kill(victim, signal.SIGKILL)
        assert _procs.wait_gone([victim]) == []
        for i in range(1, len(ds)):
            try:
                got.append(ds[i].tolist())
            except WorkerDiedError:  # it was loading this one
                got.append(ds[i].tolist())
        assert victim not in ds.worker_pids
    assert got == want[1]


FIRST_USES = {
    "set_epoch": lambda ds: ds.set_epoch(0),
    "with": lambda ds: ds.__enter__(),
    "worker_pids": lambda ds: ds.worker_pids,
    "stats": lambda ds: ds.stats(),
}


@pytest.mark.parametrize("first_use", sorted(FIRST_USES))
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_state_changed_after_the_workers_started_reaches_the_first_read(
    start_method, first_use
):
    """Kind E: the workers start at first use with the loader as it is
    then, and load ahead at once; a change made between that first use and
    the first read is a change before the first epoch, and LoaderDataset
    (which loads at the read) shows it. Found by the differential test:
    `set_epoch(0)`, `level += 1`, `ds[0]` gave the batch of level 0."""
    loader = sl.LevelLoader()
    ds = PrefetchLoaderDataset(
        loader, IDS, batch_size=4, num_workers=2, start_method=start_method
    )
    try:
        FIRST_USES[first_use](ds)  # workers start, with level 0
        loader.level = 7
        got = [ds[i].tolist() for i in range(len(ds))]
    finally:
        ds.close()
    assert levels(got) == [7], got
