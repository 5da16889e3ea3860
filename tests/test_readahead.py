"""The engine's caller-side read-ahead policy (`keras_oom.readahead`):
re-reads of an epoch's first batches (`ReReadCache`) and reads out of order
(`OrderWatch`). No processes."""

from __future__ import annotations

import contextlib
import gc
import os

import _faults
import _sample_loaders
import numpy as np
import pytest
from test_transport import in_memfd, memfd_mappings

from keras_oom import PrefetchLoaderDataset
from keras_oom.readahead import OrderWatch, ReReadCache

CLASS_NAMES = sorted(_faults.CLASSES)


# -- ReReadCache --------------------------------------------------------------------


def test_rereadcache_serves_a_reread_of_the_same_key():
    cache = ReReadCache(size=2)
    cache.seen((0, 0), "b0")
    cache.seen((0, 1), "b1")
    assert cache.get((0, 0)) == (True, "b0")
    assert cache.get((0, 1)) == (True, "b1")
    assert cache.get((1, 0)) == (False, None)  # another epoch's batch 0
    assert len(cache) == 2


def test_rereadcache_returns_copies():
    cache = ReReadCache()
    batch = np.zeros(3)
    cache.seen((0, 0), batch)
    batch[0] = 1  # the caller changes the batch it was handed
    hit, first = cache.get((0, 0))
    assert hit and first[0] == 0
    first[1] = 5  # and the copy it got from the cache
    assert cache.get((0, 0))[1][1] == 0


def test_rereadcache_forgets_after_a_later_batch():
    cache = ReReadCache(size=2)
    cache.seen((0, 0), "b0")
    cache.seen((0, 1), "b1")
    cache.seen((0, 2), "b2")
    assert len(cache) == 0
    assert cache.get((0, 0)) == (False, None)


def test_rereadcache_holds_one_epoch_only():
    """Issue 8, item 5: with two batches per epoch it was never cleared."""
    cache = ReReadCache(size=2)
    for epoch in range(30):
        cache.seen((epoch, 0), f"e{epoch}b0")
        cache.seen((epoch, 1), f"e{epoch}b1")
        assert len(cache) <= 2
        assert all(cache.get((old, 0))[0] is False for old in range(epoch))
    assert cache.get((29, 0)) == (True, "e29b0")
    cache.seen((30, 1), "x")  # a shuffled epoch starting at its batch 1
    assert len(cache) == 1
    assert cache.get((29, 0)) == (False, None)


def test_rereadcache_skips_values_that_cannot_be_copied():
    class NoCopy:
        def __deepcopy__(self, memo):
            raise TypeError("no copies")

    cache = ReReadCache()
    cache.seen((0, 0), NoCopy())
    assert cache.get((0, 0)) == (False, None)


class CopyRaises:
    """A batch whose deep copy raises `exc`, after `copies` copies worked."""

    def __init__(self, exc, copies=0):
        self.exc = exc
        self.copies = copies

    def __deepcopy__(self, memo):
        if self.copies <= 0:
            raise _faults.make(self.exc, "no copies")
        self.copies -= 1
        return CopyRaises(self.exc, 0)


@pytest.mark.parametrize("exc", CLASS_NAMES)
def test_rereadcache_skips_values_whose_copy_raises_any_class(exc):
    """Kind C: a batch whose `__deepcopy__` raised a `BaseException` (say
    `KeyboardInterrupt`) failed the read that had loaded it."""
    cache = ReReadCache()
    cache.seen((0, 0), CopyRaises(exc))
    assert cache.get((0, 0)) == (False, None)


@pytest.mark.parametrize("exc", CLASS_NAMES)
def test_rereadcache_forgets_a_kept_value_whose_second_copy_raises(exc):
    """Kind C: the copy handed out on a re-read raised (any class): a miss,
    the batch is loaded again, instead of a failed read."""
    cache = ReReadCache()
    cache.seen((0, 0), CopyRaises(exc, copies=1))  # kept: its first copy works
    assert len(cache) == 1
    assert cache.get((0, 0)) == (False, None)
    assert len(cache) == 0


def test_rereadcache_clear():
    cache = ReReadCache()
    cache.seen((0, 0), 1)
    cache.clear()
    assert len(cache) == 0


# -- OrderWatch ---------------------------------------------------------------------


def _reads(watch, keys, batches_per_epoch=10):
    """Feeds `keys` as `PrefetchLoaderDataset._note_order` does."""
    warned = []
    for key in keys:
        last = watch.last
        expected = None
        if last is not None:
            expected = (last[0], last[1] + 1)
            if expected[1] == batches_per_epoch:
                expected = (last[0] + 1, 0)
        warned.append(watch.note(key, expected))
    return warned


def test_orderwatch_in_order_never_warns():
    watch = OrderWatch()
    keys = [(e, b) for e in range(3) for b in range(10)]
    assert not any(_reads(watch, keys))
    assert watch.last == (2, 9)


def test_orderwatch_one_jump_does_not_warn():
    watch = OrderWatch()
    assert not any(_reads(watch, [(0, 0), (0, 1), (0, 6), (0, 7), (0, 8)]))
    assert not watch.warned


def test_orderwatch_a_repeated_read_is_not_out_of_order():
    watch = OrderWatch()
    assert not any(_reads(watch, [(0, 0), (0, 0), (0, 1), (0, 1), (0, 2)]))


def test_orderwatch_two_out_of_order_reads_warn_once():
    watch = OrderWatch()
    warned = _reads(watch, [(0, 0), (0, 5), (0, 2), (0, 8), (0, 3), (1, 4), (1, 7)])
    assert warned == [False, False, True, False, False, False, False]
    assert watch.warned


def test_orderwatch_batch_zero_never_counts():
    # Keras reads batch 0 before each epoch (JAX) and at each epoch's start.
    watch = OrderWatch()
    keys = [(0, 0), (0, 1), (0, 0), (0, 1), (0, 2), (0, 0), (0, 1), (0, 7)]
    assert not any(_reads(watch, keys))


def test_orderwatch_counts_per_epoch():
    watch = OrderWatch()
    # One jump in each epoch: never two in one epoch.
    keys = [(0, 0), (0, 4), (0, 5), (1, 0), (1, 6), (1, 7), (2, 0), (2, 3)]
    assert not any(_reads(watch, keys))


def test_rereadcache_keeps_read_only_batches_without_copying():
    """Zero-copy: a batch whose arrays are read-only (the Ray executor's,
    straight from the object store) cannot be changed by the caller, so
    the cache keeps and hands out the batch itself; every epoch's batches 0
    and 1 were deep-copied before."""
    # Views of read-only buffers, as Ray's arrays are (of its object store).
    x = np.frombuffer(np.arange(6.0).tobytes()).reshape(2, 3)
    y = np.frombuffer(np.array([0, 1]).tobytes(), dtype=np.int64)
    cache = ReReadCache()
    cache.seen((0, 0), (x, y))
    hit, again = cache.get((0, 0))
    assert hit
    assert again[0] is x and again[1] is y


@pytest.mark.parametrize(
    "batch",
    [
        "a list",  # replaced below by each case's own container
        "a dict",
        "a writable array in a tuple",
        "a read-only view of a writable array",
        "a read-only array that owns its data",
    ],
)
def test_rereadcache_still_copies_what_the_caller_can_change(batch):
    """A batch the caller can change in place (a writable array anywhere,
    a mutable container, a read-only view whose base is writable) is kept
    as a copy: a re-read gives the original values."""
    ro = np.frombuffer(bytes(24))  # read-only, three 0.0
    own = np.zeros(3)
    own.flags.writeable = False
    base = np.zeros(3)
    view = base[:]
    view.flags.writeable = False
    value, change = {
        "a list": ([ro], lambda v: v.__setitem__(0, None)),
        "a dict": ({"x": ro}, lambda v: v.__setitem__("x", None)),
        "a writable array in a tuple": (
            (ro, np.zeros(3)),
            lambda v: v[1].__setitem__(0, 7),
        ),
        "a read-only view of a writable array": (
            (view,),
            lambda v: base.__setitem__(0, 7),
        ),
        "a read-only array that owns its data": (
            (own,),
            lambda v: (own.setflags(write=True), own.__setitem__(0, 7)),
        ),
    }[batch]
    cache = ReReadCache()
    cache.seen((0, 0), value)
    change(value)
    hit, again = cache.get((0, 0))
    assert hit
    assert again is not value
    flat = again.values() if isinstance(again, dict) else again
    assert all(a is not None and not np.any(a) for a in flat), again


# -- ReReadCache over the local pool: batches in shared memory --------------------
#
# The local pool hands out writable arrays that are views of a worker's
# shared-memory buffer (transport.py). These tests pin what any change to
# how the cache keeps such batches must preserve (issue 16 weighed keeping
# them without a copy: readahead.py says why they are still copied).


def _memfd_descriptors() -> list[str]:
    """This process's open descriptors of keras_oom shared-memory files."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            if "keras_oom_batch" in os.readlink(f"/proc/self/fd/{fd}"):
                found.append(fd)
    return found


def _want(i: int) -> np.ndarray:
    """Batch `i` of `kept_batch_loader` over `np.arange(32)`, batch size 8."""
    rows = np.arange(8 * i, 8 * i + 8, dtype=np.float32)
    return np.broadcast_to(rows[:, None, None, None], (8, *_sample_loaders.SHAPE))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_reread_of_batches_0_and_1_ignores_the_callers_in_place_changes(
    start_method,
):
    """Kind A: the caller augments batches 0 and 1 in place (`x[:] = -1`) on
    shared memory; a re-read (TensorFlow's, JAX's) must still give them as
    loaded, from the cache, in memory apart from what the caller changed.
    A cache that kept the shared-memory batch itself would hand the changed
    values back."""
    ids = np.arange(32)
    with PrefetchLoaderDataset(
        _sample_loaders.kept_batch_loader,
        ids,
        batch_size=8,
        num_workers=2,
        start_method=start_method,
    ) as ds:
        first = [ds[0], ds[1]]
        assert all(in_memfd(b) and b.flags.writeable for b in first)
        for b in first:
            b[:] = -1  # in-place augmentation, into the worker's buffer
        hits = ds.stats()["hits"]
        again = [ds[0], ds[1]]
        assert ds.stats()["hits"] == hits + 2  # served by the cache
        for i, (b, a) in enumerate(zip(first, again, strict=True)):
            np.testing.assert_array_equal(a, _want(i), err_msg=f"batch {i}")
            assert not np.shares_memory(a, b)
            assert (b == -1).all()  # the caller's copy keeps its changes
        del first, again, b, a


@pytest.mark.timeout(90)
def test_rereads_over_many_epochs_return_every_shared_buffer():
    """Kind B: batches 0 and 1 of every epoch are read twice and dropped; the
    buffers they came in must go back to the workers when the cache forgets
    them (the epoch moves on, a later batch is read). Otherwise the parent
    maps one more buffer per epoch, and the workers run out of them (past
    the mapping budget batches cross in the socket, no longer in place)."""
    before = len(memfd_mappings())
    ids = np.arange(32)
    with PrefetchLoaderDataset(
        _sample_loaders.kept_batch_loader, ids, batch_size=8, num_workers=2
    ) as ds:
        for _ in range(30):
            for i in (0, 0, 1, 1, 2, 3):
                batch = ds[i]
                np.testing.assert_array_equal(batch, _want(i))
            ds.on_epoch_end()
        assert in_memfd(ds[0])  # still in place: buffers to spare
        del batch
        gc.collect()
        # Per worker: its free buffer and those of the batches loaded ahead.
        assert len(memfd_mappings()) - before <= 2 * 4, memfd_mappings()


@pytest.mark.timeout(60)
def test_close_with_kept_batches_leaks_no_shared_memory():
    """Kind B: `close()` while the cache keeps batches 0 and 1 (read, not
    yet re-read) must leave no mapping or descriptor of a worker's buffer
    once the caller drops what it read."""
    before_maps = set(memfd_mappings())
    before_fds = _memfd_descriptors()
    ids = np.arange(32)
    ds = PrefetchLoaderDataset(
        _sample_loaders.kept_batch_loader, ids, batch_size=8, num_workers=2
    )
    try:
        held = [ds[0], ds[1]]
        assert all(in_memfd(b) for b in held)
    finally:
        ds.close()
    np.testing.assert_array_equal(held[1], _want(1))  # held batches survive close
    del held
    gc.collect()
    assert set(memfd_mappings()) <= before_maps
    assert _memfd_descriptors() == before_fds
