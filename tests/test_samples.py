"""Per-sample loaders stacked into batches (`stack_samples`) and `batch_array`.

A stacked batch must be exactly what the same samples stacked by hand give,
whichever dataset class, start method or number of threads loads it; its
randomness must depend only on the batch, not on `threads`; and a failing
or misshapen sample must be named in the error.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import pickle

import _sample_loaders as sl
import _zero_copy_loaders as zl
import cloudpickle
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_transport import assert_same, in_memfd

from keras_oom import (
    LoaderDataset,
    PrefetchLoaderDataset,
    batch_array,
    stack_samples,
    transport,
)

pytestmark = pytest.mark.timeout(60)

IDS = np.arange(40)


def all_batches(ds, epochs=2):
    out = []
    for _ in range(epochs):
        out.extend(ds[i] for i in range(len(ds)))
        ds.on_epoch_end()
    return out


def test_stacks_samples_in_order():
    ds = LoaderDataset(stack_samples(sl.plain, threads=3), IDS, batch_size=8)
    batch = ds[1]
    assert batch.shape == (8, *sl.SHAPE) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, np.stack([sl.plain(i) for i in IDS[8:16]]))


def test_each_sample_gets_a_child_of_the_batch_rng():
    got = stack_samples(sl.noisy, threads=2)(IDS[:6], np.random.default_rng(3))
    children = np.random.default_rng(3).spawn(6)
    want = np.stack(
        [sl.noisy(i, rng) for i, rng in zip(IDS[:6], children, strict=True)]
    )
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("threads", [1, 3])
def test_rng_per_sample_does_not_depend_on_threads(threads):
    def batches(t):
        ds = LoaderDataset(
            stack_samples(sl.noisy, threads=t),
            IDS,
            batch_size=8,
            shuffle=True,
            seed=11,
        )
        return all_batches(ds)

    got, want = batches(threads), batches(1)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    # Every sample draws its own noise: no two rows of a batch share it.
    noise = got[0] - np.floor(got[0])
    assert len({row.tobytes() for row in noise}) == len(noise)
    # And the two epochs differ.
    assert not np.array_equal(np.sort(got[0], axis=None), np.sort(got[5], axis=None))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
@pytest.mark.parametrize("threads", [1, 3])
def test_same_batches_in_workers_as_in_process(start_method, threads):
    loader = stack_samples(sl.noisy, threads=threads)
    kwargs = dict(batch_size=8, shuffle=True, seed=5)
    want = all_batches(LoaderDataset(stack_samples(sl.noisy), IDS, **kwargs))
    with PrefetchLoaderDataset(
        loader, IDS, num_workers=2, start_method=start_method, **kwargs
    ) as ds:
        got = all_batches(ds)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
        # Built in the worker's shared memory, at the start of its buffer:
        # it crossed in place, not copied after a pickle.
        assert in_memfd(got[-1]) and _offset_in_mapping(got[-1]) == 0
        del got


@pytest.mark.timeout(120)
def test_multi_input_samples_in_workers():
    kwargs = dict(batch_size=8, seed=2)
    want = all_batches(LoaderDataset(stack_samples(sl.multi), IDS, **kwargs), 1)
    with PrefetchLoaderDataset(
        stack_samples(sl.multi, threads=2), IDS, num_workers=2, **kwargs
    ) as ds:
        got = all_batches(ds, 1)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
    assert got[0]["x"].shape == (8, *sl.SHAPE)
    assert got[0]["y"][0].tolist() == list(range(8))
    assert got[0]["y"][1].shape == (8,)


@pytest.mark.parametrize("threads", [1, 3])
def test_error_names_the_sample_id(threads):
    ds = LoaderDataset(stack_samples(sl.fails_on_5, threads=threads), IDS, batch_size=8)
    with pytest.raises(KeyError, match="no file for sample 5") as info:
        ds[0]
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "sample id 5" in notes
    np.testing.assert_array_equal(ds[1][0], sl.plain(8))  # the next batch loads


@pytest.mark.timeout(90)
def test_error_in_a_worker_names_the_sample_id():
    with PrefetchLoaderDataset(
        stack_samples(sl.fails_on_5, threads=2), IDS, batch_size=8, num_workers=2
    ) as ds:
        with pytest.raises(KeyError) as info:
            ds[0]
        assert "sample id 5" in "\n".join(info.value.__notes__)


@pytest.mark.parametrize("threads", [1, 3])
def test_samples_of_different_shapes_are_refused(threads):
    ds = LoaderDataset(stack_samples(sl.ragged, threads=threads), IDS, batch_size=8)
    with pytest.raises(ValueError, match=r"sample id 4 is shape \(4, 2\)") as info:
        ds[0]
    assert "(3, 2)" in str(info.value)


def test_samples_of_different_structures_are_refused():
    loader = stack_samples(lambda i: (np.zeros(2),) if i else {"a": np.zeros(2)})
    with pytest.raises(ValueError, match="sample id"):
        loader(np.arange(3))


def test_pickles_without_its_thread_pool():
    loader = stack_samples(sl.plain, threads=2)
    first = loader(IDS[:4])
    copy = pickle.loads(cloudpickle.dumps(loader))
    assert copy._pool is None and copy.threads == 2
    np.testing.assert_array_equal(copy(IDS[:4]), first)


@pytest.mark.timeout(30)
def test_a_forked_process_makes_its_own_thread_pool():
    loader = stack_samples(sl.plain, threads=2)
    loader(IDS[:4])  # the parent's pool exists now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            ok = (loader(IDS[:4])[3] == 3).all() and loader._pool_owner.here()
            os.write(w, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        assert f.read() == b"ok"
    os.waitpid(pid, 0)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"threads": 0}, ValueError),
        ({"threads": "2"}, TypeError),
        ({"threads": True}, TypeError),
    ],
)
def test_bad_threads(kwargs, error):
    with pytest.raises(error, match="threads"):
        stack_samples(sl.plain, **kwargs)


def test_bad_sample_loader():
    with pytest.raises(TypeError, match="sample_loader"):
        stack_samples("not a function")


def test_batch_array_outside_a_worker_is_plain_memory():
    out = batch_array((256, 1024), np.float32)
    assert out.shape == (256, 1024) and out.dtype == np.float32
    assert out.flags.c_contiguous and out.flags.writeable and out.flags.owndata
    assert not in_memfd(out)
    assert batch_array(3).shape == (3,)


@pytest.mark.parametrize(
    "shape, error", [((-1, 2), ValueError), ("ab", TypeError), ((1.5,), TypeError)]
)
def test_batch_array_bad_shape(shape, error):
    with pytest.raises(error, match="shape"):
        batch_array(shape, np.float32)


def test_batch_array_in_a_forked_child_of_a_worker_is_plain(monkeypatch):
    """Only the process that activated a writer allocates in its buffers."""
    writer = transport.BatchWriter()
    monkeypatch.setattr(transport, "_ACTIVE", (os.getpid() + 1, writer))
    out = batch_array((256, 1024), np.float32)
    assert out.flags.owndata and not in_memfd(out)


def _offset_in_mapping(arr: np.ndarray) -> int:
    address = arr.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= address < end:
                return address - start
    raise AssertionError("address not mapped")


# -- issue 14: batch_array accepts what np.empty accepts, everywhere ---------


def _np_empty(case):
    return zl.describe_array(lambda: np.empty(case[0](), case[1], order=case[2]))


@pytest.mark.parametrize("k", range(len(zl.batch_array_cases())))
def test_batch_array_is_np_empty_in_the_caller(k):
    """Kind A (issue 14, batch_array bullet): the same result as `np.empty`.

    `map(int, ["4", "1024"])` gave shape `()`, a 0-d array was refused.
    """
    case = zl.batch_array_cases()[k]
    got = zl.describe_array(lambda: zl.call_batch_array(case))
    assert got == _np_empty(case)


@pytest.mark.parametrize("k", range(len(zl.batch_array_cases())))
def test_batch_array_is_np_empty_in_a_worker_process(k, monkeypatch):
    """Kind A (issue 14, batch_array bullet): a worker's shared memory gives the
    same shape, dtype, strides and errors as `np.empty` (a subarray dtype
    raised in a worker only)."""
    monkeypatch.setattr(transport, "_ACTIVE", None)
    writer = transport.BatchWriter()
    writer.activate()
    case = zl.batch_array_cases()[k]
    made = []

    def make():
        made.append(zl.call_batch_array(case))
        return made[-1]

    assert zl.describe_array(make) == _np_empty(case)
    big = made and made[0].nbytes >= transport.SHARED_MEMORY_THRESHOLD
    if big and not made[0].dtype.hasobject:
        assert in_memfd(made[0])  # really the worker's path


@pytest.mark.timeout(90)
def test_batch_array_in_real_workers_is_np_empty():
    """Kind A (issue 14, batch_array bullet): through a real worker, every case."""
    cases = zl.batch_array_cases()
    want = [_np_empty(c) for c in cases]
    with PrefetchLoaderDataset(
        zl.batch_array_loader,
        np.arange(len(cases)),
        batch_size=len(cases),
        num_workers=1,
    ) as ds:
        assert ds[0].tolist() == want


def test_batch_array_errors_name_the_parameter():
    with pytest.raises(TypeError, match=r"`dtype`.*'not a dtype'"):
        batch_array(3, "not a dtype")
    with pytest.raises(ValueError, match=r"`order`.*'A'"):
        batch_array(3, np.float32, "A")
    with pytest.raises(ValueError, match=r"`shape`.*\(4, -1\).*negative"):
        batch_array((4, -1))
    with pytest.raises(TypeError, match=r"`shape`.*None"):
        batch_array(None)
    with pytest.raises(TypeError, match=r"`shape`.*map.*tuple\(shape\)"):
        batch_array(map(int, ["4", "1024"]))


_SHAPE_PARTS = st.integers(-2, 300)
_SHAPES = st.one_of(
    st.integers(-3, 70000).map(lambda n: lambda: n),
    st.lists(_SHAPE_PARTS, max_size=3).map(lambda d: lambda: tuple(d)),
    st.lists(_SHAPE_PARTS, max_size=3).map(lambda d: lambda: list(d)),
    st.lists(_SHAPE_PARTS, max_size=3).map(lambda d: lambda: iter(d)),
    st.lists(_SHAPE_PARTS, max_size=3).map(lambda d: lambda: [np.int32(x) for x in d]),
    st.lists(_SHAPE_PARTS, max_size=3).map(lambda d: lambda: np.array(d, np.int64)),
    st.integers(0, 70000).map(lambda n: lambda: np.array(n)),
    st.sampled_from([2**40, 2**63, 1.5, "7", None, True, (2, 2.0), np.array(3.0)]).map(
        lambda v: lambda: v
    ),
)
_DTYPES = st.sampled_from(
    [
        np.float32,
        "f8",
        np.uint8,
        "<i2",
        ">u4",
        "U5",
        "S3",
        object,
        bool,
        None,
        "V16",
        np.dtype((np.float32, (3,))),
        np.dtype((np.int16, (2, 2))),
        np.dtype([("a", "f4"), ("b", "i8")]),
        np.dtype([("a", "u1"), ("b", "f8")], align=True),
        np.dtype([("o", object), ("x", "f4")]),
        "bogus",
        3.5,
    ]
)


@settings(max_examples=300, deadline=None)
@given(shape=_SHAPES, dtype=_DTYPES, order=st.sampled_from(["C", "F", "c", "A", 1]))
def test_batch_array_matches_np_empty_property(shape, dtype, order):
    """Kind A (issue 14, batch_array bullet): for any input, in the caller and in
    a worker, `batch_array` gives what `np.empty` gives, or its error type."""
    want = zl.describe_array(lambda: np.empty(shape(), dtype, order=order))
    assert zl.describe_array(lambda: batch_array(shape(), dtype, order)) == want
    previous = transport._ACTIVE
    try:
        transport.BatchWriter().activate()
        got = zl.describe_array(lambda: batch_array(shape(), dtype, order))
    finally:
        transport._ACTIVE = previous
    assert got == want


# -- issue 14: stack_samples gives what np.stack gives ------------------------


def np_stack_tree(samples):
    """Stacks the samples' leaves with np.stack, in the first sample's structure."""
    first = samples[0]
    if isinstance(first, dict):
        return {k: np_stack_tree([s[k] for s in samples]) for k in first}
    if isinstance(first, tuple):
        parts = [np_stack_tree([s[i] for s in samples]) for i in range(len(first))]
        if hasattr(type(first), "_fields"):
            return type(first)(*parts)
        return parts if type(first) is tuple else type(first)(parts)
    return np.stack([np.asarray(s) for s in samples])


def assert_same_tree(got, want):
    if isinstance(want, dict):
        assert type(got) is dict and list(got) == list(want)
        for k in want:
            assert_same_tree(got[k], want[k])
    elif isinstance(want, (tuple, list)):
        if isinstance(want, list):
            want = tuple(want)
        assert type(got) is type(want) and len(got) == len(want), (got, want)
        for g, w in zip(got, want, strict=True):
            assert_same_tree(g, w)
    else:
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


class Pair(tuple):
    """A tuple subclass that is not a namedtuple: built from one iterable."""


def _table(samples):
    """A sample loader returning `samples[i]`."""
    return lambda i: samples[int(i)]


@pytest.mark.parametrize("threads", [1, 3])
def test_dicts_with_keys_in_another_order_are_stacked(threads):
    """Kind A (issue 14, stack_samples bullet): key order is not structure."""
    samples = [
        {"a": np.full(3, i), "b": np.float32(i)}
        if i % 2
        else {"b": np.float32(i), "a": np.full(3, i)}
        for i in range(6)
    ]
    got = stack_samples(_table(samples), threads=threads)(np.arange(6))
    assert list(got) == ["b", "a"]  # the first sample's order
    assert_same_tree(got, np_stack_tree(samples))


@pytest.mark.parametrize("threads", [1, 3])
def test_strings_of_different_lengths_promote_as_in_np_stack(threads):
    """Kind A (issue 14, stack_samples bullet): `<U9` and `<U10` file names."""
    names = [f"img{i}.png" for i in (5, 10, 7, 123)]  # <U8, <U9, <U8, <U10
    loader = stack_samples(lambda i: (names[int(i)], np.int32(i)), threads=threads)
    got = loader(np.arange(4))
    assert got[0].dtype == np.dtype("<U10")
    assert_same_tree(
        got, np_stack_tree([(n, np.int32(i)) for i, n in enumerate(names)])
    )


@pytest.mark.parametrize("threads", [1, 3])
def test_numbers_of_different_dtypes_promote_as_in_np_stack(threads):
    """Kind A (issue 14, stack_samples bullet): int32, then float32, then int64."""
    samples = [np.int32(1), np.float32(2.5), np.int64(3), np.int32(4)]
    got = stack_samples(_table(samples), threads=threads)(np.arange(4))
    assert got.dtype == np.float64
    assert_same_tree(got, np_stack_tree(samples))


def test_a_tuple_subclass_that_is_not_a_namedtuple_is_rebuilt():
    """Kind A (issue 14, stack_samples bullet): `TypeError: tuple expected at
    most 1 argument` before."""
    samples = [Pair((np.full(2, i), np.int64(i))) for i in range(3)]
    got = stack_samples(_table(samples))(np.arange(3))
    assert type(got) is Pair
    assert_same_tree(got, np_stack_tree(samples))


@pytest.mark.parametrize("threads", [1, 3])
def test_a_ragged_sample_names_its_id_and_leaf(threads):
    """Kind A (issue 14, stack_samples bullet): a sample that is itself ragged."""

    def sample(i):
        x = [[1, 2], [3]] if int(i) == 4 else [[1, 2], [3, 4]]
        return {"x": x, "y": np.int64(i)}

    with pytest.raises(ValueError, match=r"sample id 4.*\['x'\]") as info:
        stack_samples(sample, threads=threads)(np.arange(6))
    assert "inhomogeneous" in str(info.value)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_mismatch_names_the_sample_id_and_the_leaf(threads):
    """Kind A (issue 14, stack_samples bullet): which leaf differs, and where."""

    def sample(i):
        return {"x": np.zeros((4 if int(i) == 3 else 3, 2)), "y": (np.int64(i),)}

    with pytest.raises(ValueError, match=r"\['x'\].*sample id 3 is shape \(4, 2\)"):
        stack_samples(sample, threads=threads)(np.arange(6))

    def bad_dtype(i):  # np.stack cannot combine datetimes and floats
        y = np.datetime64(1, "s") if int(i) == 2 else np.float64(i)
        return {"x": np.zeros(2), "y": (y,)}

    with pytest.raises(TypeError, match=r"\['y'\]\[0\].*sample id 2"):
        stack_samples(bad_dtype, threads=threads)(np.arange(6))
    missing = [{"a": 1, "b": 2}, {"a": 1}]
    with pytest.raises(ValueError, match=r"sample id 1.*'b'"):
        stack_samples(_table(missing))(np.arange(2))


@pytest.mark.timeout(30)
def test_structure_comes_from_the_first_id_whatever_arrives_first():
    """Kind A (issue 14, stack_samples bullet): with threads, sample 1 arrives
    before sample 0; the result still has sample 0's key order."""
    import threading

    second_done = threading.Event()

    def sample(i):
        if int(i) == 0:
            assert second_done.wait(10)
            return {"a": np.int64(0), "b": np.int64(0)}
        second_done.set()
        return {"b": np.int64(i), "a": np.int64(i)}

    got = stack_samples(sample, threads=2)(np.arange(2))
    assert list(got) == ["a", "b"]
    assert got["a"].tolist() == [0, 1] and got["b"].tolist() == [0, 1]


_LEAF_DTYPES = st.sampled_from(
    [
        "i1",
        "u1",
        "i4",
        "i8",
        "u8",
        "f2",
        "f4",
        "f8",
        "c8",
        "b1",
        "U3",
        "U7",
        "S2",
        "M8[s]",
    ]
)


@st.composite
def _sample_batches(draw):
    """Samples of one structure (dict key order varies), leaves of varied dtype."""
    n = draw(st.integers(1, 5))
    shapes = draw(st.lists(st.sampled_from([(), (2,), (2, 3)]), min_size=1, max_size=3))
    kind = draw(st.sampled_from(["leaf", "tuple", "dict", "nested"]))
    samples = []
    for _ in range(n):
        leaves = []
        for shape in shapes:
            dtype = np.dtype(draw(_LEAF_DTYPES))
            values = draw(st.lists(st.integers(0, 100), min_size=6, max_size=6))
            leaves.append(
                np.array(values[: int(np.prod(shape))]).astype(dtype).reshape(shape)
            )
        if kind == "leaf":
            samples.append(leaves[0])
        elif kind == "tuple":
            samples.append(tuple(leaves))
        else:
            keys = [f"k{j}" for j in range(len(leaves))]
            order = draw(st.permutations(keys))
            d = {k: leaves[int(k[1:])] for k in order}
            samples.append(d if kind == "dict" else (d, leaves[0]))
    return samples


@settings(max_examples=200, deadline=None)
@given(samples=_sample_batches(), threads=st.sampled_from([1, 3]))
def test_stack_samples_matches_np_stack_property(samples, threads):
    """Kind A (issue 14, stack_samples bullet): the batch is what np.stack gives
    for each leaf (same dtype promotion), or an error where np.stack refuses."""
    try:
        want = np_stack_tree(samples)
    except TypeError:  # dtypes np.stack cannot promote (strings and numbers)
        with pytest.raises(TypeError, match="sample id"):
            stack_samples(_table(samples), threads=threads)(np.arange(len(samples)))
        return
    got = stack_samples(_table(samples), threads=threads)(np.arange(len(samples)))
    assert_same_tree(got, want)
