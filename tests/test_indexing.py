"""Unit tests of `keras_oom.indexing`: epoch orders and the batch plan.

Everything the datasets promise about order (every sample once per epoch,
the same batches for the same seed, resuming at any epoch) rests on these
two pure functions of `(seed, epoch)`, so they are tested on their own.
"""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_oom.indexing import (
    BatchPlan,
    epoch_permutation,
    locate,
    shard_positions,
    shard_size,
)

seeds = st.integers(min_value=0, max_value=2**32 - 1)
epochs = st.integers(min_value=0, max_value=10_000)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), seed=seeds, epoch=epochs)
def test_epoch_permutation_is_a_permutation(n, seed, epoch):
    order = epoch_permutation(n, seed, epoch)
    assert order.ndim == 1
    assert np.issubdtype(order.dtype, np.integer)
    assert sorted(order.tolist()) == list(range(n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), seed=seeds, epoch=epochs)
def test_epoch_permutation_is_deterministic_per_seed_and_epoch(n, seed, epoch):
    np.testing.assert_array_equal(
        epoch_permutation(n, seed, epoch), epoch_permutation(n, seed, epoch)
    )


def test_epoch_permutation_ignores_call_history():
    expected = epoch_permutation(100, 7, 5)
    for e in range(10):  # other epochs in between must not matter
        epoch_permutation(100, 7, e)
    np.testing.assert_array_equal(epoch_permutation(100, 7, 5), expected)


def test_epoch_permutation_differs_across_epochs():
    orders = {tuple(epoch_permutation(50, 123, e)) for e in range(20)}
    assert len(orders) == 20


def test_epoch_permutation_differs_across_seeds():
    orders = {tuple(epoch_permutation(50, s, 0)) for s in range(20)}
    assert len(orders) == 20


def test_epoch_permutation_seed_and_epoch_are_not_interchangeable():
    # (seed=1, epoch=2) and (seed=2, epoch=1) must be different streams.
    assert not np.array_equal(epoch_permutation(50, 1, 2), epoch_permutation(50, 2, 1))


def test_epoch_permutation_of_one_sample():
    assert epoch_permutation(1, 0, 0).tolist() == [0]


@pytest.mark.parametrize(
    ("n", "bs", "drop", "expected"),
    [
        (10, 3, False, 4),
        (10, 3, True, 3),
        (9, 3, False, 3),
        (9, 3, True, 3),
        (1, 1, False, 1),
        (5, 5, True, 1),
        (7, 1, False, 7),
    ],
)
def test_batches_per_epoch(n, bs, drop, expected):
    plan = BatchPlan(n, bs, shuffle=False, seed=0, drop_remainder=drop)
    assert plan.batches_per_epoch == expected


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 300),
    shuffle=st.booleans(),
    drop=st.booleans(),
    seed=seeds,
    epoch=st.integers(0, 50),
)
def test_plan_positions_cover_each_sample_once_per_epoch(
    data, n, shuffle, drop, seed, epoch
):
    bs = data.draw(st.integers(1, n), label="batch_size")
    plan = BatchPlan(n, bs, shuffle=shuffle, seed=seed, drop_remainder=drop)
    batches = [plan.positions(epoch, b) for b in range(plan.batches_per_epoch)]
    sizes = [len(b) for b in batches]
    assert all(s == bs for s in sizes[:-1])
    if drop:
        assert sizes[-1] == bs
        assert sum(sizes) == n - n % bs
    else:
        assert sizes[-1] == (n % bs or bs)
        assert sum(sizes) == n
    flat = np.concatenate(batches).tolist()
    assert len(set(flat)) == len(flat)  # no sample twice
    assert set(flat) <= set(range(n))
    if not drop:
        assert sorted(flat) == list(range(n))


def test_plan_unshuffled_positions_are_in_order():
    plan = BatchPlan(10, 4, shuffle=False, seed=0, drop_remainder=False)
    for epoch in (0, 3):
        assert [plan.positions(epoch, b).tolist() for b in range(3)] == [
            [0, 1, 2, 3],
            [4, 5, 6, 7],
            [8, 9],
        ]


def test_plan_shuffled_order_is_the_epoch_permutation():
    plan = BatchPlan(30, 7, shuffle=True, seed=99, drop_remainder=False)
    for epoch in range(4):
        np.testing.assert_array_equal(
            plan.order(epoch), epoch_permutation(30, 99, epoch)
        )
        joined = np.concatenate([plan.positions(epoch, b) for b in range(5)])
        np.testing.assert_array_equal(joined, epoch_permutation(30, 99, epoch))


def test_plan_orders_are_read_only():
    plan = BatchPlan(10, 2, shuffle=True, seed=1, drop_remainder=False)
    with pytest.raises(ValueError):
        plan.order(0)[0] = 5


def test_plan_cache_keeps_working_after_many_epochs():
    plan = BatchPlan(40, 8, shuffle=True, seed=5, drop_remainder=False)
    for epoch in range(200):
        np.testing.assert_array_equal(
            plan.order(epoch), epoch_permutation(40, 5, epoch)
        )
    assert len(plan._orders) <= BatchPlan._CACHED_EPOCHS
    # Going back to an evicted epoch recomputes the same order.
    for epoch in (0, 1, 150, 199, 0):
        np.testing.assert_array_equal(
            plan.order(epoch), epoch_permutation(40, 5, epoch)
        )
    # Interleaved access to more epochs than the cache holds stays correct.
    for _ in range(3):
        for epoch in range(BatchPlan._CACHED_EPOCHS + 2):
            np.testing.assert_array_equal(
                plan.positions(epoch, 1), epoch_permutation(40, 5, epoch)[8:16]
            )


def test_plan_is_thread_safe():
    plan = BatchPlan(200, 10, shuffle=True, seed=3, drop_remainder=False)
    expected = {e: epoch_permutation(200, 3, e) for e in range(12)}
    errors = []

    def work(offset):
        try:
            for k in range(300):
                e = (k + offset) % 12
                b = k % 20
                got = plan.positions(e, b)
                if not np.array_equal(got, expected[e][b * 10 : b * 10 + 10]):
                    errors.append((e, b))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("shuffle", [False, True])
def test_plan_pickles(shuffle):
    plan = BatchPlan(25, 4, shuffle=shuffle, seed=11, drop_remainder=True)
    before = [plan.positions(e, b).tolist() for e in range(3) for b in range(6)]
    clone = pickle.loads(pickle.dumps(plan))
    assert clone.batches_per_epoch == plan.batches_per_epoch == 6
    assert (clone.num_samples, clone.batch_size, clone.seed) == (25, 4, 11)
    assert clone.shuffle is shuffle and clone.drop_remainder is True
    after = [clone.positions(e, b).tolist() for e in range(3) for b in range(6)]
    assert after == before
    # The clone has its own working lock.
    assert clone._lock is not plan._lock
    with clone._lock:
        pass


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 200),
    count=st.integers(1, 9),
    mode=st.sampled_from(["pad", "drop"]),
    seed=seeds,
    epoch=st.integers(0, 20),
)
def test_shards_are_disjoint_equal_and_cover_the_epoch(n, count, mode, seed, epoch):
    order = epoch_permutation(n, seed, epoch)
    size = shard_size(n, count, mode)
    parts = [shard_positions(order, i, count, mode) for i in range(count)]
    assert all(len(p) == size for p in parts)  # same steps in every process
    flat = np.concatenate(parts).tolist()
    if mode == "drop":
        assert size == n // count
        assert len(set(flat)) == len(flat)  # disjoint
        assert set(flat) == set(order[: size * count].tolist())
    else:
        assert size == -(-n // count)
        assert set(flat) == set(range(n))  # every sample is read
        if count <= n:
            assert len(flat) - len(set(flat)) == size * count - n  # only padding


def test_unsharded_positions_are_the_order():
    order = epoch_permutation(10, 1, 0)
    assert shard_positions(order, 0, 1, "pad") is order


@given(
    index=st.integers(-50, 200),
    epoch=st.integers(0, 5),
    per_epoch=st.integers(1, 12),
    start=st.integers(0, 11),
    repeat=st.booleans(),
)
def test_locate_reads_the_stream_position_index_0_names_plus_index(
    index, epoch, per_epoch, start, repeat
):
    """`locate` against its definition: index 0 is batch `start` of `epoch`,
    index `i` the stream position `i` after it; negative indexes count from
    the end of one epoch; out of range (or negative with `repeat`) raises
    IndexError, naming the index."""
    start %= per_epoch
    valid = index >= 0 if repeat else -per_epoch <= index < per_epoch
    if not valid:
        with pytest.raises(IndexError, match=str(index)):
            locate(index, epoch, start, per_epoch, repeat)
        return
    i = index % per_epoch if index < 0 else index
    position = epoch * per_epoch + start + i
    assert locate(index, epoch, start, per_epoch, repeat) == divmod(position, per_epoch)


@pytest.mark.parametrize("index", [1.0, "0", None])
def test_locate_refuses_an_index_that_is_not_an_integer(index):
    """Bad input: a TypeError naming `index` and the value."""
    with pytest.raises(TypeError, match="index"):
        locate(index, 0, 0, 4, False)
