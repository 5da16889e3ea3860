"""Sharding for multi-process training: `shard=(index, count)` and `shard_mode`.

Properties checked across all shards of one epoch, for random sizes, shard
counts, batch sizes and seeds:

- every shard has the same number of batches (or collectives would hang);
- `"drop"`: shards are disjoint and together hold all but
  `len(sample_ids) % count` samples, the last ones of the epoch's order;
- `"pad"`: shards together hold every sample, and only the first samples of
  the epoch's order are repeated, to fill the last shards.
"""

from __future__ import annotations

import re
import sys
import types
import warnings
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_oom import LoaderDataset, PrefetchLoaderDataset
from keras_oom.indexing import epoch_permutation
from keras_oom.sharding import auto_shard, resolve_shard

PROPERTY = settings(max_examples=50, deadline=None)


def identity(ids):
    return ids


# For worker processes: a loader that pickles by reference to NumPy, so that a
# freshly started worker need not import this module (and keras with it).
light_loader = np.copy


def shard_batches(n, count, mode, *, batch_size, shuffle, seed, epoch, **kwargs):
    """Batch ids of one epoch for every shard: a list (per shard) of lists."""
    ids = np.arange(n) * 3 + 1  # ids that are not positions
    out = []
    for index in range(count):
        ds = LoaderDataset(
            identity,
            ids,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            shard=(index, count),
            shard_mode=mode,
            **kwargs,
        )
        assert ds.shard == (index, count)
        ds.set_epoch(epoch)
        out.append([ds.batch_ids(i) for i in range(len(ds))])
    return ids, out


@st.composite
def sharded_setups(draw):
    count = draw(st.integers(1, 8))
    mode = draw(st.sampled_from(["pad", "drop"]))
    n = draw(st.integers(count, 300))
    per_shard = -(-n // count) if mode == "pad" else n // count
    batch_size = draw(st.integers(1, per_shard))
    shuffle = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    epoch = draw(st.integers(0, 5))
    return n, count, mode, batch_size, shuffle, seed, epoch


def epoch_order(ids, shuffle, seed, epoch):
    if not shuffle:
        return ids
    return ids[epoch_permutation(len(ids), seed, epoch)]


@PROPERTY
@given(sharded_setups())
def test_shards_cover_every_sample_once_or_as_documented(setup):
    n, count, mode, batch_size, shuffle, seed, epoch = setup
    ids, shards = shard_batches(
        n, count, mode, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch
    )
    # Same number of batches, and of samples, in every shard.
    assert len({len(batches) for batches in shards}) == 1
    sizes = [sum(len(b) for b in batches) for batches in shards]
    assert len(set(sizes)) == 1
    seen = np.concatenate([np.concatenate(batches) for batches in shards])
    counts = Counter(seen.tolist())
    order = epoch_order(ids, shuffle, seed, epoch)
    if mode == "drop":
        kept = (n // count) * count
        assert len(seen) == kept
        assert max(counts.values()) == 1, "drop: shards must be disjoint"
        # What is left out is the tail of the epoch's order.
        assert set(counts) == set(order[:kept].tolist())
    else:
        total = -(-n // count) * count
        assert len(seen) == total
        assert set(counts) == set(ids.tolist()), "pad: every sample is read"
        extra = total - n  # < count <= n: each padded sample repeats once
        assert extra < count <= n
        repeated = sorted(i for i, c in counts.items() if c == 2)
        assert max(counts.values()) <= 2
        # Only the first samples of the epoch's order are repeated.
        assert repeated == sorted(order[:extra].tolist())


@PROPERTY
@given(sharded_setups())
def test_drop_remainder_keeps_equal_batch_counts(setup):
    n, count, mode, batch_size, shuffle, seed, epoch = setup
    _, shards = shard_batches(
        n,
        count,
        mode,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        drop_remainder=True,
    )
    assert len({len(batches) for batches in shards}) == 1
    for batches in shards:
        assert all(len(b) == batch_size for b in batches)
    seen = np.concatenate([np.concatenate(b) for b in shards if b])
    if mode == "drop":
        assert len(set(seen.tolist())) == len(seen)


@PROPERTY
@given(
    st.integers(2, 6),
    st.integers(12, 200),
    st.integers(0, 2**32 - 1),
)
def test_shards_are_a_function_of_seed_and_epoch(count, n, seed):
    """Processes agree on their shards without talking: same seed, same split."""
    _, first = shard_batches(
        n, count, "pad", batch_size=1, shuffle=True, seed=seed, epoch=3
    )
    _, again = shard_batches(
        n, count, "pad", batch_size=1, shuffle=True, seed=seed, epoch=3
    )
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))


def test_one_shard_is_the_unsharded_dataset():
    ids = np.arange(37)
    plain = LoaderDataset(identity, ids, batch_size=5, shuffle=True, seed=4)
    one = LoaderDataset(identity, ids, batch_size=5, shuffle=True, seed=4, shard=(0, 1))
    for epoch in range(3):
        plain.set_epoch(epoch)
        one.set_epoch(epoch)
        for i in range(len(plain)):
            np.testing.assert_array_equal(plain.batch_ids(i), one.batch_ids(i))


def test_shuffled_epochs_differ_per_shard():
    """Each shard gets a new mix of samples every epoch, not a fixed subset."""
    ds = LoaderDataset(
        identity, np.arange(100), batch_size=10, shuffle=True, seed=1, shard=(0, 2)
    )
    first = set(np.concatenate([ds.batch_ids(i) for i in range(len(ds))]).tolist())
    ds.on_epoch_end()
    second = set(np.concatenate([ds.batch_ids(i) for i in range(len(ds))]).tolist())
    assert first != second


def test_labels_follow_the_sharded_ids():
    ids = np.arange(30)
    ds = LoaderDataset(
        lambda b: b * 10,
        ids,
        labels=ids + 1000,
        batch_size=4,
        shuffle=True,
        seed=9,
        shard=(1, 3),
    )
    for i in range(len(ds)):
        x, y = ds[i]
        np.testing.assert_array_equal(x, ds.batch_ids(i) * 10)
        np.testing.assert_array_equal(y, ds.batch_ids(i) + 1000)


# -- errors -------------------------------------------------------------------

BOTH = pytest.mark.parametrize(
    "cls", [LoaderDataset, PrefetchLoaderDataset], ids=["Loader", "Prefetch"]
)


@BOTH
def test_shuffled_sharded_dataset_needs_a_seed(cls):
    with pytest.raises(ValueError, match=r"`seed`.*Received: seed=None"):
        cls(identity, np.arange(20), batch_size=2, shuffle=True, shard=(0, 2))


def test_unshuffled_or_single_shard_needs_no_seed():
    LoaderDataset(identity, np.arange(20), batch_size=2, shard=(1, 2))
    LoaderDataset(identity, np.arange(20), batch_size=2, shuffle=True, shard=(0, 1))


@BOTH
@pytest.mark.parametrize(
    "shard",
    [(2, 2), (-1, 2), (0, 0), (3, 1), (5, -2)],
    ids=str,
)
def test_shard_index_out_of_range(cls, shard):
    with pytest.raises(
        ValueError, match=r"`shard`.*Received: shard=" + re.escape(repr(shard))
    ):
        cls(identity, np.arange(20), batch_size=2, shard=shard)


@BOTH
@pytest.mark.parametrize("shard", ["all", "AUTO", "", "0/2"])
def test_unknown_shard_string(cls, shard):
    with pytest.raises(ValueError, match=r"`shard`.*'auto'.*Received: shard="):
        cls(identity, np.arange(20), batch_size=2, shard=shard)
    with pytest.raises(ValueError, match=re.escape(repr(shard))):
        cls(identity, np.arange(20), batch_size=2, shard=shard)


@BOTH
@pytest.mark.parametrize(
    "shard",
    [3, (0.5, 2), (0,), (0, 1, 2), ("0", "2"), (0, None), 2.0],
    ids=repr,
)
def test_shard_not_a_pair_of_integers(cls, shard):
    with pytest.raises(TypeError, match=r"`shard`.*pair of integers.*Received: shard="):
        cls(identity, np.arange(20), batch_size=2, shard=shard)


@BOTH
@pytest.mark.parametrize(
    "shard",
    [(True, 2), (0, True), (False, True), (np.bool_(True), 2), (1, np.bool_(True))],
    ids=repr,
)
def test_bools_are_not_shard_integers(cls, shard):
    """`True` is an int to Python and NumPy, but never an intended index."""
    with pytest.raises(TypeError, match=r"`shard`.*pair of integers") as info:
        cls(identity, np.arange(20), batch_size=2, shard=shard)
    assert f"Received: shard={shard!r}" in str(info.value)


@pytest.mark.parametrize(
    "shard",
    [
        (np.int64(1), np.int32(4)),
        (np.uint8(1), np.int16(4)),
        np.array([1, 4]),
        [1, 4],
    ],
    ids=["int64-int32", "uint8-int16", "ndarray", "list"],
)
def test_numpy_integers_are_accepted_as_shard(shard):
    ds = LoaderDataset(identity, np.arange(20), batch_size=2, shard=shard)
    assert ds.shard == (1, 4)
    assert [type(v) for v in ds.shard] == [int, int]


@BOTH
@pytest.mark.parametrize("mode", ["bogus", "PAD", None, ""])
def test_unknown_shard_mode(cls, mode):
    with pytest.raises(
        ValueError, match=r"`shard_mode`.*Received: shard_mode=" + re.escape(repr(mode))
    ):
        cls(identity, np.arange(20), batch_size=2, shard=(0, 2), shard_mode=mode)


def test_unknown_shard_mode_is_reported_without_sharding():
    with pytest.raises(ValueError, match="shard_mode='bogus'"):
        LoaderDataset(identity, np.arange(20), batch_size=2, shard_mode="bogus")


def test_drop_with_more_shards_than_samples():
    with pytest.raises(ValueError, match=r"shard_mode='drop'.*leaves no samples"):
        LoaderDataset(
            identity, np.arange(3), batch_size=1, shard=(0, 4), shard_mode="drop"
        )
    # pad repeats samples so that every shard has one
    ds = LoaderDataset(identity, np.arange(3), batch_size=1, shard=(3, 4))
    assert len(ds) == 1


def test_batch_size_is_checked_per_shard():
    with pytest.raises(ValueError, match=r"per shard.*batch_size=11"):
        LoaderDataset(
            identity, np.arange(20), batch_size=11, shard=(0, 2), drop_remainder=True
        )
    ds = LoaderDataset(identity, np.arange(20), batch_size=11, shard=(0, 2))
    assert len(ds) == 1 and len(ds[0]) == 10  # one short batch per shard


# -- shard="auto" -------------------------------------------------------------


@BOTH
def test_auto_is_a_no_op_in_one_process(cls):
    kwargs = {"num_workers": 1} if cls is PrefetchLoaderDataset else {}
    ds = cls(
        light_loader, np.arange(10), batch_size=2, shuffle=True, shard="auto", **kwargs
    )
    try:
        assert ds.shard == (0, 1)
        assert len(ds) == 5
    finally:
        if cls is PrefetchLoaderDataset:
            ds.close()
    assert resolve_shard("auto", "pad") == (0, 1)
    assert resolve_shard(None, "drop") == (0, 1)


def test_auto_reads_the_jax_process(monkeypatch):
    jax = pytest.importorskip("jax")
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax, "process_index", lambda: 3)
    assert auto_shard() == (3, 4)
    ds = LoaderDataset(
        identity, np.arange(40), batch_size=2, shuffle=True, seed=0, shard="auto"
    )
    assert ds.shard == (3, 4)
    assert len(ds) == 5


def fake_tensorflow(monkeypatch, cluster, task_type, task_id):
    """Installs a stand-in `tensorflow` whose strategy has a cluster resolver.

    TensorFlow is not installed in the test environment; `auto_shard` only
    reads `tf.distribute.get_strategy().cluster_resolver`.
    """
    jax = sys.modules.get("jax")
    if jax is not None:  # no JAX cluster: TensorFlow decides
        monkeypatch.setattr(jax, "process_count", lambda: 1)
    resolver = types.SimpleNamespace(
        task_type=task_type,
        task_id=task_id,
        cluster_spec=lambda: types.SimpleNamespace(as_dict=lambda: cluster),
    )
    strategy = types.SimpleNamespace(cluster_resolver=resolver)
    fake_tf = types.SimpleNamespace(
        distribute=types.SimpleNamespace(get_strategy=lambda: strategy)
    )
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    return strategy


CHIEF_AND_3 = {"chief": ["d:1"], "worker": ["a:1", "b:1", "c:1"]}
EVALUATED = {**CHIEF_AND_3, "evaluator": ["e:1"]}
WORKERS_ONLY = {"worker": ["a:1", "b:1", "c:1"]}


@pytest.mark.parametrize(
    ("cluster", "task_type", "task_id", "expected"),
    [
        # TensorFlow counts the chief as worker 0 (multi_worker_util.id_in_cluster)
        (CHIEF_AND_3, "chief", 0, (0, 4)),
        (CHIEF_AND_3, "worker", 0, (1, 4)),
        (CHIEF_AND_3, "worker", 1, (2, 4)),
        (CHIEF_AND_3, "worker", 2, (3, 4)),
        # without a chief, worker 0 leads and the workers are the cluster
        (WORKERS_ONLY, "worker", 1, (1, 3)),
        # an evaluator does not train: it reads everything
        (EVALUATED, "evaluator", 0, (0, 1)),
        (EVALUATED, "worker", 2, (3, 4)),
        # a parameter server reads no data of its own
        ({**CHIEF_AND_3, "ps": ["p:1", "q:1"]}, "ps", 1, (0, 1)),
        # a chief alone is one process
        ({"chief": ["d:1"]}, "chief", 0, (0, 1)),
    ],
    ids=[
        "chief",
        "worker0",
        "worker1",
        "worker2",
        "no-chief-worker1",
        "evaluator",
        "worker2-with-evaluator",
        "ps",
        "chief-alone",
    ],
)
def test_auto_reads_a_tensorflow_multi_worker_strategy(
    monkeypatch, cluster, task_type, task_id, expected
):
    fake_tensorflow(monkeypatch, cluster, task_type, task_id)
    assert auto_shard() == expected


@pytest.mark.parametrize(
    "cluster",
    [CHIEF_AND_3, EVALUATED, WORKERS_ONLY],
    ids=["chief-and-3", "with-evaluator", "workers-only"],
)
def test_tensorflow_training_tasks_get_disjoint_shards(monkeypatch, cluster):
    """Every chief and worker gets its own shard; together they cover all."""
    seen = []
    for task_type in ("chief", "worker"):
        for task_id in range(len(cluster.get(task_type, []))):
            fake_tensorflow(monkeypatch, cluster, task_type, task_id)
            seen.append(auto_shard())
    count = len(cluster.get("chief", [])) + len(cluster["worker"])
    assert sorted(seen) == [(i, count) for i in range(count)]


def test_auto_without_a_tensorflow_cluster_is_one_process(monkeypatch):
    # The default strategy has no cluster resolver.
    strategy = fake_tensorflow(monkeypatch, WORKERS_ONLY, "worker", 1)
    strategy.cluster_resolver = None
    assert auto_shard() == (0, 1)
    # A resolver outside a cluster has no task type.
    fake_tensorflow(monkeypatch, {}, None, None)
    assert auto_shard() == (0, 1)


# -- the prefetching dataset shards alike -------------------------------------

PREFETCH_CASES = [
    # n, count, mode, batch_size, shuffle, drop_remainder
    (23, 2, "pad", 3, True, False),
    (23, 3, "drop", 2, True, True),
    (40, 4, "pad", 4, False, False),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", PREFETCH_CASES, ids=str)
def test_prefetch_shards_equal_loader_shards(case):
    n, count, mode, batch_size, shuffle, drop_remainder = case
    ids = np.arange(n) * 7
    kwargs = dict(
        batch_size=batch_size,
        shuffle=shuffle,
        seed=11,
        drop_remainder=drop_remainder,
        shard_mode=mode,
    )
    for index in range(count):
        plain = LoaderDataset(identity, ids, shard=(index, count), **kwargs)
        with PrefetchLoaderDataset(
            light_loader, ids, shard=(index, count), num_workers=2, **kwargs
        ) as pre:
            assert len(pre) == len(plain)
            assert pre.shard == plain.shard == (index, count)
            for _ in range(2):  # two epochs, read in order
                for i in range(len(plain)):
                    np.testing.assert_array_equal(pre[i], plain[i])
                pre.on_epoch_end()
                plain.on_epoch_end()
            # and a few out-of-order reads (which warn; not the point here)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                for i in [len(plain) - 1, 0, len(plain) // 2]:
                    np.testing.assert_array_equal(pre[i], plain[i])
