"""seeding.py: per-batch randomness as a pure function of (seed, epoch, position).

The promises: equal arguments give equal streams (in any process, after any
history); any different argument gives a different stream; the batch streams
are apart from the epoch permutations of indexing.py; reseeding the global
generators makes `np.random` and `random` repeat per batch; `accepts_rng`
says exactly when a loader declared `rng`.
"""

from __future__ import annotations

import doctest
import functools
import pickle
import random
import subprocess
import sys

import cloudpickle
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import keras_oom.seeding
from keras_oom.indexing import epoch_permutation
from keras_oom.seeding import (
    accepts_rng,
    batch_position,
    batch_rng,
    batch_seed,
    seed_global_generators,
)

seeds = st.integers(0, 2**64 - 1)
small = st.integers(0, 10_000)
triples = st.tuples(seeds, small, small)


def first_draws(rng: np.random.Generator) -> list[int]:
    return rng.integers(0, 2**63, size=4).tolist()


# -- batch_seed / batch_rng ---------------------------------------------------


@given(triples)
def test_equal_arguments_give_equal_streams(args):
    assert first_draws(batch_rng(*args)) == first_draws(batch_rng(*args))
    np.testing.assert_array_equal(
        batch_seed(*args).generate_state(8), batch_seed(*args).generate_state(8)
    )


@given(triples, st.integers(0, 2), st.integers(1, 2**32))
def test_any_different_argument_gives_a_different_stream(args, which, delta):
    other = list(args)
    other[which] += delta
    assert first_draws(batch_rng(*args)) != first_draws(batch_rng(*other))


@given(seeds, small, small)
def test_swapping_epoch_and_position_gives_a_different_stream(seed, a, b):
    # The spawn key is ordered: (epoch=a, position=b) is not (epoch=b, position=a).
    if a != b:
        assert first_draws(batch_rng(seed, a, b)) != first_draws(batch_rng(seed, b, a))


@given(triples)
def test_independent_of_the_epoch_permutation_stream(args):
    seed, epoch, position = args
    permutation_rng = np.random.default_rng([seed, epoch])
    assert first_draws(batch_rng(seed, epoch, position)) != first_draws(permutation_rng)
    # Nor is it the stream a naive [seed, epoch, position] seeding would give.
    naive = np.random.default_rng([seed, epoch, position])
    assert first_draws(batch_rng(seed, epoch, position)) != first_draws(naive)


def test_batch_streams_are_not_correlated_with_the_epoch_order():
    # The shuffle and the augmentation of one epoch must not move together.
    seed, epoch = 3, 1
    order = epoch_permutation(1000, seed, epoch)
    draws = np.array([batch_rng(seed, epoch, p).random() for p in range(1000)])
    r = np.corrcoef(order, draws)[0, 1]
    assert abs(r) < 0.15, r


def test_same_stream_in_a_fresh_interpreter():
    code = (
        "from keras_oom.seeding import batch_rng; "
        "print(batch_rng(12345, 6, 7).integers(0, 2**63, size=4).tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": ":".join(sys.path), "PYTHONHASHSEED": "random"},
        timeout=60,
    ).stdout
    assert out.strip() == str(first_draws(batch_rng(12345, 6, 7)))


def test_numpy_integers_are_accepted():
    assert first_draws(batch_rng(np.uint32(5), np.int64(1), np.int8(2))) == (
        first_draws(batch_rng(5, 1, 2))
    )


@pytest.mark.parametrize(
    "args, name, error",
    [
        ((-1, 0, 0), "seed", ValueError),
        ((0, -1, 0), "epoch", ValueError),
        ((0, 0, -2), "position", ValueError),
        ((1.5, 0, 0), "seed", TypeError),
        ((0, True, 0), "epoch", TypeError),
        ((0, 0, "3"), "position", TypeError),
    ],
)
def test_bad_arguments_name_the_parameter(args, name, error):
    with pytest.raises(error, match=f"`{name}`.*Received: {name}="):
        batch_seed(*args)


@pytest.mark.parametrize("flag", [True, np.True_, np.False_])
@pytest.mark.parametrize("where", ["seed", "epoch", "position"])
def test_numpy_bools_are_refused_like_python_bools(flag, where):
    """Kind: bad input. A bool is never an intended seed, epoch or position,
    and NumPy's bool (which `operator.index` accepts) is no exception."""
    args = {"seed": 0, "epoch": 0, "position": 0, where: flag}
    with pytest.raises(TypeError, match=f"`{where}` must be .*Received: {where}="):
        batch_seed(**args)
    with pytest.raises(TypeError, match="`batch` must be"):
        batch_position(flag, (0, 1))


# -- batch_position -----------------------------------------------------------


@given(st.integers(1, 16).flatmap(lambda c: st.tuples(st.just(c), st.integers(1, 20))))
def test_positions_number_every_batch_of_every_shard_once(count_and_batches):
    count, batches = count_and_batches
    positions = [
        batch_position(b, (i, count)) for b in range(batches) for i in range(count)
    ]
    assert sorted(positions) == list(range(count * batches))


def test_unsharded_position_is_the_batch():
    assert [batch_position(b, (0, 1)) for b in range(5)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "batch, shard, error, match",
    [
        (-1, (0, 1), ValueError, "`batch`"),
        (0, (2, 2), ValueError, "shard=\\(2, 2\\)"),
        (0, (-1, 2), ValueError, "`shard index`"),
        (0, 3, TypeError, "shard=3"),
        (0.5, (0, 1), TypeError, "`batch`"),
    ],
)
def test_bad_positions_name_the_argument(batch, shard, error, match):
    with pytest.raises(error, match=match):
        batch_position(batch, shard)


# -- seed_global_generators ---------------------------------------------------


def global_draws() -> tuple[list[float], list[float]]:
    return np.random.random(3).tolist(), [random.random() for _ in range(3)]


@pytest.fixture
def restore_global_generators():
    np_state, py_state = np.random.get_state(), random.getstate()
    yield
    np.random.set_state(np_state)
    random.setstate(py_state)


@pytest.mark.usefixtures("restore_global_generators")
@given(triples)
def test_global_reseed_is_reproducible(args):
    seed_global_generators(batch_seed(*args))
    first = global_draws()
    np.random.random(5)  # whatever happened in between
    random.random()
    seed_global_generators(batch_seed(*args))
    assert global_draws() == first


@pytest.mark.usefixtures("restore_global_generators")
@given(seeds, small, small, st.integers(1, 1000))
def test_global_reseed_differs_per_position(seed, epoch, position, delta):
    seed_global_generators(batch_seed(seed, epoch, position))
    a = global_draws()
    seed_global_generators(batch_seed(seed, epoch, position + delta))
    b = global_draws()
    assert a[0] != b[0] and a[1] != b[1]


@pytest.mark.usefixtures("restore_global_generators")
def test_numpy_and_random_get_different_streams():
    seed_global_generators(batch_seed(0, 0, 0))
    np_draws, py_draws = global_draws()
    assert np_draws != py_draws


def test_global_reseed_does_not_consume_the_sequence():
    seq = batch_seed(1, 2, 3)
    before = seq.generate_state(4)
    state = np.random.get_state(), random.getstate()
    try:
        seed_global_generators(seq)
    finally:
        np.random.set_state(state[0])
        random.setstate(state[1])
    np.testing.assert_array_equal(seq.generate_state(4), before)
    assert seq.n_children_spawned == 0


def test_torch_is_seeded_only_when_already_imported(monkeypatch):
    calls = []
    fake = type(sys)("torch")
    fake.manual_seed = calls.append  # type: ignore[attr-defined]
    state = np.random.get_state(), random.getstate()
    try:
        monkeypatch.delitem(sys.modules, "torch", raising=False)
        seed_global_generators(batch_seed(0, 0, 0))
        assert "torch" not in sys.modules  # never imported here
        assert calls == []
        monkeypatch.setitem(sys.modules, "torch", fake)
        seed_global_generators(batch_seed(0, 0, 0))
        seed_global_generators(batch_seed(0, 0, 1))
    finally:
        np.random.set_state(state[0])
        random.setstate(state[1])
    assert len(calls) == 2 and calls[0] != calls[1]
    assert all(isinstance(c, int) and 0 <= c < 2**63 for c in calls)


# -- accepts_rng --------------------------------------------------------------


def f_rng(ids, rng):
    return ids


def f_kw_only(ids, *, rng=None):
    return ids


def f_plain(ids):
    return ids


def f_kwargs(ids, **kwargs):
    return ids


def f_positional_only(ids, rng, /):
    return ids


def f_other_name(ids, generator):
    return ids


def f_varargs(ids, *rng):
    return ids


class Loader:
    def load(self, ids, rng):
        return ids

    def plain(self, ids):
        return ids

    def __call__(self, ids, rng=None):
        return ids


class PlainCallable:
    def __call__(self, ids):
        return ids


TRUTH_TABLE = [
    (f_rng, True),
    (f_kw_only, True),
    (lambda ids, rng: ids, True),
    (lambda ids: ids, False),
    (f_plain, False),
    (f_kwargs, False),
    (f_positional_only, False),  # cannot be passed as rng=
    (f_other_name, False),
    (f_varargs, False),
    (Loader().load, True),
    (Loader().plain, False),
    (Loader(), True),
    (PlainCallable(), False),
    (functools.partial(f_rng), True),
    (functools.partial(f_kw_only, np.arange(3)), True),
    (functools.partial(f_rng, rng=None), False),  # the caller chose its rng
    (functools.partial(f_plain), False),
    (len, False),  # a builtin
    (print, False),
    (np.add, False),  # a ufunc: no inspectable signature
]


@pytest.mark.parametrize(
    "fn, expected", TRUTH_TABLE, ids=[str(i) for i in range(len(TRUTH_TABLE))]
)
def test_accepts_rng_truth_table(fn, expected):
    assert accepts_rng(fn) is expected


@pytest.mark.parametrize(
    "fn, expected",
    [(lambda ids, rng: ids, True), (lambda ids: ids, False), (f_kw_only, True)],
)
def test_accepts_rng_after_cloudpickle(fn, expected):
    assert accepts_rng(pickle.loads(cloudpickle.dumps(fn))) is expected


def test_accepts_rng_on_a_closure_pickled_by_value():
    def make(offset):
        def load(ids, *, rng):
            return ids + offset

        return load

    restored = pickle.loads(cloudpickle.dumps(make(3)))
    assert accepts_rng(restored)


def test_accepts_rng_never_raises_on_odd_callables():
    class Weird:
        @property
        def __signature__(self):
            raise ValueError("no signature")

        def __call__(self, ids, rng):
            return ids

    assert accepts_rng(Weird()) is False
    assert accepts_rng(object) is False  # a class: object() takes no rng


# -- the module's own examples --------------------------------------------------


def test_docstring_examples():
    result = doctest.testmod(keras_oom.seeding)
    assert result.attempted > 0 and result.failed == 0
