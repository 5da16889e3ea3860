"""Per-sample loaders (`stack_samples`), and `batch_array` (arrays.py).

`stack_samples(sample_loader, threads=N)` turns a function of one sample id
into a loader of batches: it calls the function per id, optionally in a
thread pool of its own in each process, and writes each sample into its
row of a `batch_array` as it arrives, so that a worker sends the batch with
no copy (arrays.py, transport.py).

`batch_array` is defined in arrays.py and importable from here, as it always
was.

This module runs in workers too: it imports neither Keras nor a backend.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_oom import seeding
from keras_oom.arrays import batch_array
from keras_oom.checks import as_index
from keras_oom.per_process import Owner, PerProcess
from keras_oom.protocol import add_note, describe_id

__all__ = ["StackedSamples", "batch_array", "stack_samples"]


def stack_samples(
    sample_loader: Callable[..., Any], *, threads: int = 1
) -> Callable[..., Any]:
    """Turns a loader of one sample into a loader of batches.

    The batch loader calls `sample_loader(sample_id)` for each id of the
    batch and writes each result into its row of a `batch_array` of shape
    `(len(ids), *sample.shape)` as it arrives, so a batch loaded in a
    `PrefetchLoaderDataset` worker crosses to the caller with no copy.
    Samples may be arrays (or scalars, strings, nested lists) or tuples or
    dicts of them, for multi-input models: each leaf is stacked into its
    own array.

    One rule: the batch equals what `np.stack` gives for each leaf over the
    batch's samples, with the same dtype promotion (`int32` and `float32`
    samples give `float64`; file names of 9 and 10 characters give
    `<U10`), in the structure of the batch's first sample: the same dict
    keys in any order match, and the result has the first sample's key
    order and tuple type (a namedtuple or any other tuple subclass).

    If `sample_loader` declares a parameter named `rng`, each sample gets a
    `numpy.random.Generator` of its own, spawned from the batch's generator
    in the order of the ids: results depend on the dataset's seed, the
    epoch and the batch, not on `threads` or on which worker loads it.

    With `threads > 1`, each process that runs the loader (the caller's, or
    each worker) calls the sample loader in a thread pool of its own,
    started at the first batch. Threads help loaders that release the GIL
    while they wait or compute: file and network reads, JPEG decoders
    (Pillow, simplejpeg, OpenCV), most NumPy operations on large arrays.
    Workers then keep both cores and the disk busy without more processes.

    Args:
        sample_loader: A function of one sample id, `sample_loader(id)` or
            `sample_loader(id, rng)`, returning an array-like, or a tuple or
            dict of them. Every sample of a batch must have the same
            structure and, leaf by leaf, the same shape, and dtypes that
            `np.stack` can combine. It must pickle with `cloudpickle` when
            workers are not forked, as for any loader.
        threads: How many samples to load at once in each process, `>= 1`.

    Returns:
        A loader for `LoaderDataset` and `PrefetchLoaderDataset`, called as
        `loader(ids, rng)`. It pickles (with `cloudpickle` if
        `sample_loader` needs it); its thread pool does not travel.

    Raises:
        TypeError: If `sample_loader` is not callable or `threads` is not an
            integer.
        ValueError: If `threads < 1`.

    The returned loader raises what `sample_loader` raises, with a note
    naming the sample id; a `ValueError` naming two sample ids and the leaf
    (`leaf ['x'][0]`) when their samples differ in structure or shape, or
    one sample's leaf is not an array (a ragged nested list); and NumPy's
    `DTypePromotionError` (a `TypeError`), naming them too, for dtypes
    `np.stack` cannot combine (datetimes and numbers).

    Example:

    ```python
    >>> import numpy as np
    >>> from keras_oom import LoaderDataset, stack_samples
    >>> def one(i):
    ...     return np.full(3, i, dtype=np.int32)
    >>> ds = LoaderDataset(stack_samples(one, threads=2), np.arange(6),
    ...                    batch_size=2)
    >>> ds[2].tolist()
    [[4, 4, 4], [5, 5, 5]]

    A multi-input sample, and randomness per sample:

    >>> def two(i, rng):
    ...     return {"x": np.full(2, i), "noise": rng.random()}
    >>> batch = LoaderDataset(stack_samples(two), np.arange(6), batch_size=3,
    ...                       seed=0)[0]
    >>> batch["x"].shape, batch["noise"].shape
    ((3, 2), (3,))

    ```
    """
    if not callable(sample_loader):
        raise TypeError(
            f"`sample_loader` must be callable, as sample_loader(id) or "
            f"sample_loader(id, rng). Received: sample_loader={sample_loader!r}"
        )
    threads = as_index(threads, "threads", minimum=1, what="a positive integer")
    return StackedSamples(sample_loader, threads)


class StackedSamples(PerProcess):
    """The batch loader that `stack_samples` returns."""

    def __init__(self, sample_loader: Callable[..., Any], threads: int) -> None:
        self.sample_loader = sample_loader
        self.threads = threads
        self._wants_rng = seeding.accepts_rng(sample_loader)
        self._init_runtime()

    def _init_runtime(self) -> None:
        # Per process (per_process.py): a copy gets none of these.
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_owner: Owner | None = None  # the process that made _pool

    def __repr__(self) -> str:
        return f"stack_samples({self.sample_loader!r}, threads={self.threads})"

    def __call__(self, ids: Any, rng: np.random.Generator | None = None) -> Any:
        """Loads the samples `ids` and returns them stacked into a batch."""
        n = len(ids)
        if n == 0:
            raise ValueError("`stack_samples` cannot stack an empty batch: no ids.")
        seeds: list[Any] = [None] * n
        kind: Any = None
        if self._wants_rng:
            # One child per row, in id order: independent of `threads`. As
            # `rng.spawn(n)`, but each generator is made by its own task.
            rng = rng if rng is not None else np.random.default_rng()
            seed_seq: Any = rng.bit_generator.seed_seq  # a SeedSequence
            seeds = seed_seq.spawn(n)
            kind = type(rng.bit_generator)
        stack = _Stack(ids)
        if self.threads == 1 or n == 1:
            for k in range(n):
                sample = self._load_one(ids[k], seeds[k], kind)
                stack.put(k, _Sample(sample, ids[k]))
            return stack.batch()
        results: queue.SimpleQueue[tuple[int, Any, BaseException | None]]
        results = queue.SimpleQueue()

        def task(k: int) -> None:
            try:
                sample = self._load_one(ids[k], seeds[k], kind)
                results.put((k, _Sample(sample, ids[k]), None))  # flattened here
            except BaseException as e:
                results.put((k, None, e))

        pool = self._executor()
        futures = [pool.submit(task, k) for k in range(n)]
        try:
            for _ in range(n):
                k, sample, error = results.get()
                if error is not None:
                    raise error
                stack.put(k, sample)
                del sample  # written into its row; keep only the batch
        finally:
            for f in futures:  # after an error, start no more samples
                f.cancel()
        return stack.batch()

    def _load_one(self, sample_id: Any, seed: Any, kind: Any) -> Any:
        try:
            if self._wants_rng:
                rng = np.random.Generator(kind(seed))
                return self.sample_loader(sample_id, rng=rng)
            return self.sample_loader(sample_id)
        except BaseException as e:
            add_note(
                e,
                f"keras_oom.stack_samples: raised by sample_loader for sample "
                f"id {describe_id(sample_id)}",
            )
            raise

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """This process's thread pool, made at its first batch."""
        owner = self._pool_owner
        if owner is None or not owner.here():  # none, or a fork's copy
            if owner is not None:  # the parent's lock may have been held
                self._lock = threading.Lock()
            with self._lock:
                if self._pool_owner is None or not self._pool_owner.here():
                    pool = concurrent.futures.ThreadPoolExecutor(
                        self.threads, thread_name_prefix="keras_oom-samples"
                    )
                    # Ends with the loader, or at interpreter exit.
                    weakref.finalize(
                        self, pool.shutdown, wait=False, cancel_futures=True
                    )
                    self._pool, self._pool_owner = pool, Owner()
        assert self._pool is not None
        return self._pool


class _Sample:
    """One sample taken apart: its structure, and its leaves as arrays by path.

    Tuples and dicts are nodes, anything else a leaf (`np.asarray`, as
    `np.stack` does). A path is the keys and indices from the sample to a
    leaf; dict keys are matched by name, whatever their order.

    Raises:
        ValueError, TypeError: If a leaf is not an array (a ragged nested
            list), naming the sample id and the leaf.
    """

    def __init__(self, sample: Any, sample_id: Any) -> None:
        self.leaves: dict[tuple[Any, ...], np.ndarray] = {}
        self.structure = self._take_apart(sample, (), sample_id)

    def _take_apart(self, node: Any, path: tuple[Any, ...], sample_id: Any) -> Any:
        if isinstance(node, dict):
            return (
                "dict",
                {
                    k: self._take_apart(v, (*path, k), sample_id)
                    for k, v in node.items()
                },
            )
        if isinstance(node, tuple):
            children = [
                self._take_apart(v, (*path, i), sample_id) for i, v in enumerate(node)
            ]
            return ("tuple", type(node), children)
        try:
            self.leaves[path] = np.asarray(node)
        except (ValueError, TypeError) as e:
            raise type(e)(
                f"`stack_samples` cannot make an array of sample id "
                f"{_show(sample_id)}'s {_leaf_name(path)}: {e}"
            ) from e
        return None


class _Stack:
    """The batch being filled: one `batch_array` per leaf, rows as samples arrive.

    The first sample to arrive sets the leaves, their shapes and dtypes;
    the first id's sample sets the structure of the result (key order,
    tuple types). A sample whose leaf has another dtype waits aside; the
    batch then takes the dtype `np.stack` gives (`np.result_type` of the
    dtypes in id order), and every value is cast once, from its own dtype.
    """

    def __init__(self, ids: Any) -> None:
        self.ids = ids
        self.first: int | None = None  # the first sample to arrive
        self.first_sample: _Sample | None = None
        self.structure: Any = None  # of the first id's sample
        self.paths: list[tuple[Any, ...]] = []
        self.outs: list[np.ndarray] = []
        self.dtypes: list[dict[int, np.dtype]] = []  # per leaf: id index -> dtype
        self.aside: list[dict[int, np.ndarray]] = []  # per leaf: other dtypes

    def put(self, k: int, sample: _Sample) -> None:
        if k == 0:
            self.structure = sample.structure
        if self.first_sample is None:
            self.first, self.first_sample = k, sample
            self.paths = list(sample.leaves)
            self.outs = [
                batch_array((len(self.ids), *leaf.shape), leaf.dtype)
                for leaf in sample.leaves.values()
            ]
            self.dtypes = [{} for _ in self.paths]
            self.aside = [{} for _ in self.paths]
        else:
            self._check(k, sample)
        for i, path in enumerate(self.paths):
            leaf = sample.leaves[path]
            self.dtypes[i][k] = leaf.dtype
            if leaf.dtype == self.outs[i].dtype:
                self.outs[i][k] = leaf
            else:
                self._promotion(i, k)  # fails early if np.stack would
                self.aside[i][k] = leaf

    def _check(self, k: int, sample: _Sample) -> None:
        first = self.first_sample
        assert first is not None and self.first is not None
        where = _difference(first.structure, sample.structure, ())
        if where is not None:
            path, first_has, this_has = where
            at = f" at {_leaf_name(path)}" if path else ""
            raise ValueError(
                f"`stack_samples` needs samples of one structure, but{at} "
                f"sample id {_show(self.ids[k])} is {this_has} and sample id "
                f"{_show(self.ids[self.first])} is {first_has}."
            )
        for path, out in zip(self.paths, self.outs, strict=True):
            leaf = sample.leaves[path]
            if leaf.shape != out.shape[1:]:
                raise ValueError(
                    f"`stack_samples` needs samples of one shape per leaf, but "
                    f"at {_leaf_name(path)} sample id {_show(self.ids[k])} is "
                    f"shape {leaf.shape} and sample id "
                    f"{_show(self.ids[self.first])} is shape {out.shape[1:]}."
                )

    def _promotion(self, i: int, k: int) -> np.dtype:
        """The dtype `np.stack` gives leaf `i`'s dtypes so far, in id order."""
        seen = self.dtypes[i]
        try:
            return np.result_type(*(seen[j] for j in sorted(seen)))
        except TypeError as e:  # DTypePromotionError
            other = next(j for j in sorted(seen) if seen[j] != seen[k])
            raise type(e)(
                f"`stack_samples` cannot stack {_leaf_name(self.paths[i])}: "
                f"sample id {_show(self.ids[k])} is dtype {seen[k]} and sample "
                f"id {_show(self.ids[other])} is dtype {seen[other]}, which "
                f"np.stack cannot combine ({e})"
            ) from e

    def batch(self) -> Any:
        for i, aside in enumerate(self.aside):
            if not aside:
                continue
            out = self.outs[i]
            dtype = self._promotion(i, next(iter(aside)))
            if dtype != out.dtype:
                rows = [j for j in self.dtypes[i] if j not in aside]
                new = batch_array(out.shape, dtype)
                new[rows] = out[rows]  # each value cast once, from its dtype
                self.outs[i] = out = new
            for j, leaf in aside.items():
                out[j] = leaf
        by_path = dict(zip(self.paths, self.outs, strict=True))
        return _rebuild(self.structure, (), by_path)


def _difference(a: Any, b: Any, path: tuple[Any, ...]) -> Any:
    """`(path, a's, b's)` where two structures first differ, else None."""
    if a is None or b is None:
        if a is None and b is None:
            return None
        return path, _skeleton(a), _skeleton(b)
    if a[0] != b[0]:
        return path, _skeleton(a), _skeleton(b)
    if a[0] == "dict":
        if a[1].keys() != b[1].keys():
            return path, _skeleton(a), _skeleton(b)
        for key, child in a[1].items():
            found = _difference(child, b[1][key], (*path, key))
            if found is not None:
                return found
        return None
    if a[1] is not b[1] or len(a[2]) != len(b[2]):
        return path, _skeleton(a), _skeleton(b)
    for index, (x, y) in enumerate(zip(a[2], b[2], strict=True)):
        found = _difference(x, y, (*path, index))
        if found is not None:
            return found
    return None


def _rebuild(structure: Any, path: tuple[Any, ...], by_path: dict) -> Any:
    if structure is None:
        return by_path[path]
    if structure[0] == "dict":
        return {k: _rebuild(c, (*path, k), by_path) for k, c in structure[1].items()}
    _, kind, children = structure
    values = [_rebuild(c, (*path, i), by_path) for i, c in enumerate(children)]
    if kind is tuple:
        return tuple(values)
    if hasattr(kind, "_fields"):  # a namedtuple
        return kind._make(values)
    try:  # another tuple subclass: built from an iterable, as tuple is
        return kind(values)
    except TypeError:
        return tuple.__new__(kind, values)


def _skeleton(structure: Any) -> str:
    if structure is None:
        return "an array"
    if structure[0] == "dict":
        return f"a dict with keys {sorted(structure[1], key=repr)}"
    _, kind, children = structure
    name = "a tuple" if kind is tuple else f"a {kind.__name__}"
    return f"{name} of {len(children)}"


def _leaf_name(path: tuple[Any, ...]) -> str:
    """`sample['x'][1]`-style name of a leaf, or `the sample` for the root."""
    if not path:
        return "the sample"
    return "leaf " + "".join(f"[{p!r}]" for p in path)


def _show(sample_id: Any) -> str:
    return repr(sample_id.item() if isinstance(sample_id, np.generic) else sample_id)
