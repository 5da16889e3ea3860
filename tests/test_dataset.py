"""Tests of `LoaderDataset`: the batches it yields and the errors it raises.

The property tests draw any number of samples (1..300), any batch size, and
every combination of shuffle / seed / drop_remainder / repeat, and check the
promises of the dataset: every epoch visits every sample exactly once, labels
stay with their samples, the order is a pure function of (seed, epoch), and
the repeat mode maps index `i` to batch `i % batches_per_epoch` of epoch
`epoch + i // batches_per_epoch`. The example tests cover indexing, thread
safety, pickling, the PyDataset keyword arguments, subclassing, and that each
bad argument is rejected with an error naming the parameter and the value.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import pickle
import threading
import time
from collections import Counter
from pathlib import Path

import cloudpickle
import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_oom
from keras_oom import LoaderDataset

FAST = settings(max_examples=60, deadline=None)


# -- module-level loaders (picklable) --------------------------------------


def identity(ids):
    return np.asarray(ids)


def times_ten(ids):
    return np.asarray(ids) * 10


def label_of(ids):
    """The label of each sample: a known function of its id."""
    return np.asarray(ids) * 3 + 1


# -- strategies --------------------------------------------------------------


@st.composite
def configs(draw, repeat=None):
    n = draw(st.integers(1, 300), label="n")
    return {
        "n": n,
        "batch_size": draw(st.integers(1, n), label="batch_size"),
        "shuffle": draw(st.booleans(), label="shuffle"),
        "seed": draw(st.integers(0, 2**32 - 1), label="seed"),
        "drop_remainder": draw(st.booleans(), label="drop_remainder"),
        "repeat": draw(st.booleans(), label="repeat") if repeat is None else repeat,
    }


def make(cfg, loader=identity, ids=None, **kwargs):
    ids = np.arange(cfg["n"]) if ids is None else ids
    return LoaderDataset(
        loader,
        ids,
        batch_size=cfg["batch_size"],
        shuffle=cfg["shuffle"],
        seed=cfg["seed"],
        drop_remainder=cfg["drop_remainder"],
        repeat=cfg["repeat"],
        **kwargs,
    )


def epochs_of(ds, num_epochs):
    """The batches of `num_epochs` consecutive epochs, as lists of ids.

    Finite datasets advance with `on_epoch_end`, as Keras does; a repeat
    dataset is read with ever growing indices, as Keras's endless iterator
    does.
    """
    per_epoch = ds.batches_per_epoch
    out = []
    for e in range(num_epochs):
        if ds.repeat:
            batches = [ds[e * per_epoch + b] for b in range(per_epoch)]
        else:
            batches = [ds[b] for b in range(len(ds))]
            ds.on_epoch_end()
        out.append([np.asarray(b).tolist() for b in batches])
    return out


def expected_per_epoch(n, bs, drop):
    return n // bs if drop else -(-n // bs)


# -- property tests ------------------------------------------------------------


@FAST
@given(cfg=configs())
def test_every_epoch_yields_every_sample_exactly_once(cfg):
    ds = make(cfg)
    n, bs = cfg["n"], cfg["batch_size"]
    for batches in epochs_of(ds, 3):
        flat = [i for b in batches for i in b]
        counts = Counter(flat)
        assert all(c == 1 for c in counts.values()), "a sample came twice"
        assert set(flat) <= set(range(n))
        if cfg["drop_remainder"]:
            assert len(flat) == n - n % bs
        else:
            assert sorted(flat) == list(range(n))


@FAST
@given(cfg=configs())
def test_batch_sizes_are_batch_size_except_possibly_the_last(cfg):
    ds = make(cfg)
    n, bs = cfg["n"], cfg["batch_size"]
    per_epoch = expected_per_epoch(n, bs, cfg["drop_remainder"])
    assert ds.batches_per_epoch == per_epoch
    if cfg["repeat"]:
        assert ds.num_batches is None
    else:
        assert len(ds) == ds.num_batches == per_epoch
    for batches in epochs_of(ds, 2):
        sizes = [len(b) for b in batches]
        assert len(sizes) == per_epoch
        assert all(s == bs for s in sizes[:-1])
        if cfg["drop_remainder"] or n % bs == 0:
            assert sizes[-1] == bs
        else:
            assert sizes[-1] == n % bs


@FAST
@given(cfg=configs())
def test_labels_stay_with_their_samples(cfg):
    n = cfg["n"]
    ids = np.arange(n) + 1000
    ds = make(cfg, ids=ids, labels=label_of(ids))
    per_epoch = ds.batches_per_epoch
    indices = range(2 * per_epoch) if cfg["repeat"] else range(per_epoch)
    for i in indices:
        x, y = ds[i]
        np.testing.assert_array_equal(x, ds.batch_ids(i))
        np.testing.assert_array_equal(y, label_of(x))


@FAST
@given(cfg=configs())
def test_dict_and_tuple_labels_stay_with_their_samples(cfg):
    n = cfg["n"]
    ids = np.arange(n)
    as_dict = make(
        cfg,
        ids=ids,
        labels={"a": label_of(ids), "b": (ids % 7).tolist(), "c": np.c_[ids, -ids]},
    )
    as_tuple = make(cfg, ids=ids, labels=(label_of(ids), list(ids % 5)))
    for i in range(as_dict.batches_per_epoch):
        x, y = as_dict[i]
        assert isinstance(y, dict) and set(y) == {"a", "b", "c"}
        np.testing.assert_array_equal(y["a"], label_of(x))
        np.testing.assert_array_equal(y["b"], x % 7)
        np.testing.assert_array_equal(y["c"], np.c_[x, -x])
        x2, y2 = as_tuple[i]
        np.testing.assert_array_equal(x2, x)  # same seed, same batch
        assert isinstance(y2, tuple) and len(y2) == 2
        np.testing.assert_array_equal(y2[0], label_of(x2))
        np.testing.assert_array_equal(y2[1], x2 % 5)


@FAST
@given(cfg=configs())
def test_order_is_deterministic_per_seed(cfg):
    a, b = make(cfg), make(cfg)
    assert epochs_of(a, 3) == epochs_of(b, 3)


@FAST
@given(cfg=configs())
def test_unshuffled_order_is_the_id_order(cfg):
    cfg = {**cfg, "shuffle": False}
    n, bs = cfg["n"], cfg["batch_size"]
    ids = np.arange(n)[::-1] * 2  # not sorted: the order is the given order
    ds = make(cfg, ids=ids)
    for batches in epochs_of(ds, 2):
        flat = [i for b in batches for i in b]
        expected = ids.tolist()
        if cfg["drop_remainder"]:
            expected = expected[: n - n % bs]
        assert flat == expected


@FAST
@given(cfg=configs(repeat=True), start=st.integers(0, 20))
def test_repeat_index_i_is_batch_i_mod_per_epoch_of_epoch_plus_i_div(cfg, start):
    endless = make(cfg)
    finite = make({**cfg, "repeat": False})
    endless.set_epoch(start)
    per_epoch = endless.batches_per_epoch
    assert endless.num_batches is None
    for i in range(0, 3 * per_epoch, max(1, per_epoch // 4)):
        finite.set_epoch(start + i // per_epoch)
        np.testing.assert_array_equal(endless[i], finite[i % per_epoch])
        np.testing.assert_array_equal(
            endless.batch_ids(i), finite.batch_ids(i % per_epoch)
        )
    assert endless.epoch == start  # reading never advances the epoch


@FAST
@given(cfg=configs(repeat=True))
def test_consecutive_repeat_epochs_each_cover_all_samples(cfg):
    ds = make(cfg)
    n, bs = cfg["n"], cfg["batch_size"]
    per_epoch = ds.batches_per_epoch
    for e in range(4):
        flat = [i for b in range(per_epoch) for i in ds[e * per_epoch + b].tolist()]
        assert len(flat) == len(set(flat))
        if cfg["drop_remainder"]:
            assert len(flat) == n - n % bs
        else:
            assert sorted(flat) == list(range(n))


def test_repeat_epochs_are_reshuffled():
    ds = LoaderDataset(
        identity, np.arange(50), batch_size=10, shuffle=True, seed=4, repeat=True
    )
    first = np.concatenate([ds[b] for b in range(5)])
    second = np.concatenate([ds[b] for b in range(5, 10)])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(50))
    assert first.tolist() != second.tolist()


def test_on_epoch_end_is_a_no_op_with_repeat():
    ds = LoaderDataset(
        identity, np.arange(10), batch_size=3, shuffle=True, seed=1, repeat=True
    )
    before = [ds[i].tolist() for i in range(8)]
    ds.on_epoch_end()
    assert ds.epoch == 0
    assert [ds[i].tolist() for i in range(8)] == before


@FAST
@given(cfg=configs(repeat=False), epochs=st.integers(1, 6))
def test_set_epoch_reproduces_on_epoch_end_sequence(cfg, epochs):
    walked = make(cfg)
    sequence = epochs_of(walked, epochs)
    assert walked.epoch == epochs
    jumped = make(cfg)
    for e in reversed(range(epochs)):  # any order of set_epoch calls
        jumped.set_epoch(e)
        assert jumped.epoch == e
        batches = [jumped[b].tolist() for b in range(len(jumped))]
        assert batches == sequence[e]


@FAST
@given(cfg=configs())
def test_getitem_equals_load_of_batch_ids(cfg):
    ds = make(cfg, loader=times_ten)
    for i in range(ds.batches_per_epoch):
        np.testing.assert_array_equal(ds[i], ds.load(ds.batch_ids(i)))
        np.testing.assert_array_equal(ds[i], ds.batch_ids(i) * 10)


@FAST
@given(cfg=configs())
def test_getitem_does_not_change_state(cfg):
    ds = make(cfg)
    per_epoch = ds.batches_per_epoch
    indices = list(range(2 * per_epoch if cfg["repeat"] else per_epoch))
    before = [ds.batch_ids(i).tolist() for i in indices]
    epoch = ds.epoch
    for i in reversed(indices):
        ds[i]
    assert ds.epoch == epoch
    assert [ds.batch_ids(i).tolist() for i in indices] == before


@FAST
@given(
    words=st.lists(
        # NumPy's fixed-width str arrays drop trailing NULs: no NULs in ids.
        st.text(st.characters(blacklist_characters="\x00"), min_size=1, max_size=12),
        min_size=1,
        max_size=60,
        unique=True,
    ),
    data=st.data(),
    shuffle=st.booleans(),
)
def test_string_ids_are_passed_as_strings(words, data, shuffle):
    bs = data.draw(st.integers(1, len(words)), label="batch_size")
    seen = []

    def loader(ids):
        assert isinstance(ids, np.ndarray) and ids.ndim == 1
        seen.extend(str(i) for i in ids)
        return np.array([len(i) for i in ids])

    lengths = [len(w) for w in words]
    ds = LoaderDataset(loader, words, labels=lengths, batch_size=bs, shuffle=shuffle)
    for i in range(len(ds)):
        x, y = ds[i]
        np.testing.assert_array_equal(x, y)  # label = len(id) stays aligned
    assert sorted(seen) == sorted(words)


def test_path_ids_reach_the_loader_as_paths(tmp_path):
    paths = [tmp_path / f"s{i}.txt" for i in range(7)]
    for i, p in enumerate(paths):
        p.write_text(str(i))

    def loader(ids):
        assert isinstance(ids, np.ndarray) and ids.shape == (len(ids),)
        assert all(isinstance(p, Path) for p in ids)
        return np.array([int(p.read_text()) for p in ids])

    ds = LoaderDataset(loader, paths, labels=np.arange(7), batch_size=3, shuffle=True)
    assert len(ds) == 3
    got = []
    for i in range(len(ds)):
        x, y = ds[i]
        np.testing.assert_array_equal(x, y)
        got.extend(x.tolist())
    assert sorted(got) == list(range(7))
    assert list(ds.sample_ids) == paths


def test_string_path_ids(tmp_path):
    names = [str(tmp_path / f"{i}.npy") for i in range(5)]
    for i, name in enumerate(names):
        np.save(name, np.full(2, i))
    ds = LoaderDataset(
        lambda ids: np.stack([np.load(p) for p in ids]), names, batch_size=2
    )
    np.testing.assert_array_equal(ds[2], [[4, 4]])
    assert ds.batch_ids(0).tolist() == names[:2]


def test_loader_receives_a_1d_ndarray_for_any_array_like():
    received = []

    def loader(ids):
        received.append(ids)
        return ids

    for sample_ids in (range(5), [0, 1, 2, 3, 4], (0, 1, 2, 3, 4), np.arange(5)):
        ds = LoaderDataset(loader, sample_ids, batch_size=2)
        assert ds[0].tolist() == [0, 1]
    assert all(isinstance(r, np.ndarray) and r.ndim == 1 for r in received)


# -- indexing ------------------------------------------------------------------


def test_len_and_num_batches():
    assert len(LoaderDataset(identity, np.arange(10), batch_size=3)) == 4
    ds = LoaderDataset(identity, np.arange(10), batch_size=3, drop_remainder=True)
    assert len(ds) == ds.num_batches == ds.batches_per_epoch == 3
    endless = LoaderDataset(identity, np.arange(10), batch_size=3, repeat=True)
    assert endless.num_batches is None
    assert endless.batches_per_epoch == 4


def test_negative_indices_count_from_the_end():
    ds = LoaderDataset(identity, np.arange(10), batch_size=3, shuffle=True, seed=2)
    for i in range(1, len(ds) + 1):
        np.testing.assert_array_equal(ds[-i], ds[len(ds) - i])
        np.testing.assert_array_equal(ds.batch_ids(-i), ds.batch_ids(len(ds) - i))
    assert ds[-1].tolist() == ds.batch_ids(3).tolist() and len(ds[-1]) == 1


@pytest.mark.parametrize("kind", [np.int8, np.int32, np.int64, np.uint8, np.uint64])
def test_numpy_integer_indices(kind):
    ds = LoaderDataset(identity, np.arange(10), batch_size=3)
    assert ds[kind(2)].tolist() == [6, 7, 8]
    assert ds.batch_ids(kind(3)).tolist() == [9]
    endless = LoaderDataset(identity, np.arange(10), batch_size=3, repeat=True)
    assert endless[kind(5)].tolist() == [3, 4, 5]


@pytest.mark.parametrize("index", [4, 5, 100, -5, -6, -1000])
def test_out_of_range_index_raises_index_error(index):
    ds = LoaderDataset(identity, np.arange(10), batch_size=3)
    with pytest.raises(IndexError, match=str(index)):
        ds[index]
    with pytest.raises(IndexError, match=str(index)):
        ds.batch_ids(index)


def test_out_of_range_stops_python_iteration():
    # The legacy iteration protocol stops at the first IndexError.
    ds = LoaderDataset(identity, np.arange(10), batch_size=3)
    assert [b.tolist() for b in ds] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


@pytest.mark.parametrize("index", [-1, -4, -100])
def test_negative_index_in_repeat_mode_raises_index_error(index):
    ds = LoaderDataset(identity, np.arange(10), batch_size=3, repeat=True)
    with pytest.raises(IndexError, match=str(index)):
        ds[index]
    with pytest.raises(IndexError, match=str(index)):
        ds.batch_ids(index)


def test_large_indices_work_in_repeat_mode():
    ds = LoaderDataset(identity, np.arange(10), batch_size=3, repeat=True)
    assert ds[4 * 1000 + 3].tolist() == [9]


@pytest.mark.parametrize("index", [1.0, "1", None, True])
def test_non_integer_index_raises_type_error(index):
    ds = LoaderDataset(identity, np.arange(10), batch_size=3)
    with pytest.raises(TypeError, match="index"):
        ds[index]


# -- epochs and seeds ---------------------------------------------------------


def test_shuffle_shuffles_samples_not_only_batches():
    ds = LoaderDataset(identity, np.arange(100), batch_size=10, shuffle=True, seed=0)
    batches = [ds[i].tolist() for i in range(10)]
    contiguous = [list(range(k * 10, k * 10 + 10)) for k in range(10)]
    assert sorted(map(sorted, batches)) != contiguous
    ds.on_epoch_end()
    assert [ds[i].tolist() for i in range(10)] != batches


def test_epoch_advances_and_set_epoch():
    ds = LoaderDataset(identity, np.arange(10), batch_size=3, shuffle=True, seed=3)
    assert ds.epoch == 0
    ds.on_epoch_end()
    ds.on_epoch_end()
    assert ds.epoch == 2
    ds.set_epoch(7)
    assert ds.epoch == 7
    ds.set_epoch(np.int64(1))
    assert ds.epoch == 1


def test_seed_none_draws_a_seed_that_reproduces_the_order():
    a = LoaderDataset(identity, np.arange(50), batch_size=7, shuffle=True)
    assert isinstance(a.seed, int) and a.seed >= 0
    b = LoaderDataset(identity, np.arange(50), batch_size=7, shuffle=True, seed=a.seed)
    assert epochs_of(a, 2) == epochs_of(b, 2)
    seeds = {LoaderDataset(identity, [1, 2], batch_size=1).seed for _ in range(8)}
    assert len(seeds) > 1  # drawn afresh each time


def test_seed_is_kept_as_given():
    ds = LoaderDataset(identity, np.arange(5), batch_size=2, seed=np.uint32(12))
    assert ds.seed == 12 and type(ds.seed) is int


def test_different_seeds_give_different_orders():
    a = LoaderDataset(identity, np.arange(60), batch_size=6, shuffle=True, seed=1)
    b = LoaderDataset(identity, np.arange(60), batch_size=6, shuffle=True, seed=2)
    assert epochs_of(a, 1) != epochs_of(b, 1)


def test_properties():
    ids = np.array([5, 3, 9])
    ds = LoaderDataset(
        identity,
        ids,
        batch_size=2,
        shuffle=True,
        seed=1,
        drop_remainder=True,
        repeat=True,
    )
    np.testing.assert_array_equal(ds.sample_ids, ids)
    assert ds.batch_size == 2 and ds.shuffle is True
    assert ds.drop_remainder is True and ds.repeat is True
    assert isinstance(ds, keras.utils.PyDataset)


# -- threads, pickling, PyDataset kwargs, subclassing -------------------------


def test_getitem_is_thread_safe():
    n, bs = 400, 7
    ids = np.arange(n) + 10

    def slow_loader(batch):
        time.sleep(0.001)
        return batch * 2

    ds = LoaderDataset(
        slow_loader, ids, labels=label_of(ids), batch_size=bs, shuffle=True, seed=9
    )
    ds.set_epoch(3)
    expected = {i: ds.batch_ids(i).tolist() for i in range(len(ds))}
    errors = []
    barrier = threading.Barrier(8)

    def hammer(t):
        barrier.wait()
        for k in range(3 * len(ds)):
            i = (k * (t + 1) + t) % len(ds)
            x, y = ds[i]
            if (x // 2).tolist() != expected[i] or y.tolist() != label_of(
                x // 2
            ).tolist():
                errors.append((t, i))

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ds.epoch == 3


@pytest.mark.parametrize("repeat", [False, True])
def test_pickle_round_trip_gives_the_same_batches(repeat):
    ids = np.arange(23)
    ds = LoaderDataset(
        times_ten,
        ids,
        labels={"y": label_of(ids)},
        batch_size=4,
        shuffle=True,
        seed=5,
        repeat=repeat,
        workers=3,
        use_multiprocessing=True,
        max_queue_size=7,
    )
    ds.set_epoch(2)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.seed == 5 and clone.epoch == 2
    assert (clone.workers, clone.use_multiprocessing, clone.max_queue_size) == (
        3,
        True,
        7,
    )
    for i in range(12 if repeat else len(ds)):
        x, y = ds[i]
        x2, y2 = clone[i]
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y["y"], y2["y"])
    if not repeat:
        ds.on_epoch_end()
        clone.on_epoch_end()
    assert [clone[i][0].tolist() for i in range(3)] == [
        ds[i][0].tolist() for i in range(3)
    ]


def test_pickle_with_cloudpickle_and_a_lambda():
    ds = LoaderDataset(lambda ids: ids + 1, np.arange(9), batch_size=4, shuffle=True)
    clone = cloudpickle.loads(cloudpickle.dumps(ds))
    assert [clone[i].tolist() for i in range(3)] == [ds[i].tolist() for i in range(3)]


def test_kwargs_pass_to_pydataset():
    ds = LoaderDataset(
        identity,
        np.arange(10),
        batch_size=2,
        workers=4,
        use_multiprocessing=True,
        max_queue_size=3,
    )
    assert ds.workers == 4
    assert ds.use_multiprocessing is True
    assert ds.max_queue_size == 3
    default = LoaderDataset(identity, np.arange(10), batch_size=2)
    assert (default.workers, default.use_multiprocessing, default.max_queue_size) == (
        1,
        False,
        10,
    )


def test_unknown_kwarg_is_rejected():
    with pytest.raises(TypeError, match="bogus"):
        LoaderDataset(identity, np.arange(10), batch_size=2, bogus=1)


class SquaresDataset(LoaderDataset):
    def load(self, ids):
        return np.asarray(ids) ** 2


def test_subclass_overriding_load_needs_no_loader():
    ids = np.arange(9)
    ds = SquaresDataset(sample_ids=ids, labels=ids, batch_size=4)
    x, y = ds[1]
    assert x.tolist() == [16, 25, 36, 49] and y.tolist() == [4, 5, 6, 7]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[2][0].tolist() == [64]


def test_subclass_load_errors_get_a_note():
    class Failing(LoaderDataset):
        def load(self, ids):
            raise KeyError("nope")

    ds = Failing(sample_ids=np.arange(9), batch_size=4)
    with pytest.raises(KeyError) as info:
        ds[2]
    assert any("batch 2" in note for note in info.value.__notes__)


# -- bad arguments (those BatchSource checks: test_source.py) ---------------------


@pytest.mark.parametrize("loader", [42, "load.py", [identity]])
def test_loader_not_callable(loader):
    with pytest.raises(TypeError, match="loader") as info:
        LoaderDataset(loader, np.arange(5), batch_size=2)
    assert repr(loader) in str(info.value)


def test_loader_missing_without_load_override():
    with pytest.raises(TypeError, match=r"loader.*None|loader=None"):
        LoaderDataset(sample_ids=np.arange(5), batch_size=2)


@pytest.mark.parametrize(("epoch", "error"), [(-1, ValueError), (1.5, TypeError)])
def test_bad_set_epoch(epoch, error):
    ds = LoaderDataset(identity, np.arange(5), batch_size=2)
    with pytest.raises(error, match=f"epoch={epoch}"):
        ds.set_epoch(epoch)
    assert ds.epoch == 0


# -- loader errors ------------------------------------------------------------------


class LoaderFailure(Exception):
    pass


def failing_on(bad_id):
    def loader(ids):
        if bad_id in ids.tolist():
            raise LoaderFailure(f"cannot read {bad_id}")
        return ids

    return loader


def test_loader_exception_keeps_its_type_and_gets_a_note():
    ds = LoaderDataset(failing_on(13), np.arange(10, 30), batch_size=5)
    with pytest.raises(LoaderFailure, match="cannot read 13") as info:
        ds[0]
    notes = info.value.__notes__
    assert len(notes) == 1
    assert "batch 0" in notes[0]
    assert "10" in notes[0] and "11" in notes[0] and "12" in notes[0]
    assert ds[1].tolist() == [15, 16, 17, 18, 19]  # other batches still load


def test_loader_exception_note_names_the_requested_batch_index():
    ds = LoaderDataset(failing_on(27), np.arange(10, 30), batch_size=5)
    with pytest.raises(LoaderFailure) as info:
        ds[-1]
    (note,) = info.value.__notes__
    assert "batch 3" in note and "25" in note
    endless = LoaderDataset(
        failing_on(27), np.arange(10, 30), batch_size=5, repeat=True
    )
    with pytest.raises(LoaderFailure) as info:
        endless[7]  # batch 3 of the second epoch
    (note,) = info.value.__notes__
    assert "batch 7" in note and "25" in note


def test_loader_exception_note_shows_string_ids():
    def loader(ids):
        raise FileNotFoundError(ids[0])

    ds = LoaderDataset(
        loader, ["a.npy", "b.npy", "c.npy", "d.npy", "e.npy"], batch_size=5
    )
    with pytest.raises(FileNotFoundError) as info:
        ds[0]
    (note,) = info.value.__notes__
    assert "batch 0" in note and "'a.npy'" in note and "5 ids" in note


def test_public_names():
    assert set(keras_oom.__all__) >= {
        "LoaderDataset",
        "PrefetchLoaderDataset",
        "WorkerDiedError",
        "WorkerTimeoutError",
        "DatasetClosedError",
    }
    assert keras_oom.LoaderDataset is LoaderDataset
    with pytest.raises(AttributeError, match="nothing"):
        keras_oom.nothing  # noqa: B018
