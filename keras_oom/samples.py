"""Batches built in place: `batch_array` and per-sample loaders (`stack_samples`).

`batch_array(shape, dtype)` is `np.empty` for a loader's batch. In a
`PrefetchLoaderDataset` worker it returns an array that lives in the
worker's shared memory, so the batch reaches the caller with no copy at all
(transport.py); everywhere else it is `np.empty`.

`stack_samples(sample_loader, threads=N)` turns a function of one sample id
into a loader of batches: it calls the function per id, optionally in a
thread pool of its own in each process, and writes each sample into its
row of a `batch_array` as it arrives.

This module runs in workers too: it imports neither Keras nor a backend.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, SupportsIndex

import numpy as np

from keras_oom import seeding, transport
from keras_oom.protocol import add_note


def batch_array(
    shape: SupportsIndex | Sequence[SupportsIndex], dtype: Any = float, order: Any = "C"
) -> np.ndarray:
    """Returns an uninitialised array to build a batch in, like `np.empty`.

    Call it in a loader in place of `np.empty` for the batch (or for each
    array of a multi-input batch), fill it, and return it. It accepts
    exactly what `np.empty(shape, dtype, order=order)` accepts and gives an
    array of the same shape, dtype and strides (a subarray dtype such as
    `np.dtype((np.float32, (3,)))` adds its dimensions to `shape`, as in
    NumPy), or raises the same error type, in every process. In the
    caller's process (a `LoaderDataset`, or any process that is not a
    `PrefetchLoaderDataset` worker) it is `np.empty`. In a worker it is an
    array in the worker's shared memory, which the parent maps: returned
    (alone, or in a tuple or dict), it crosses to the caller with no copy
    at all. A view of it (`out[:n]`) crosses in place too.

    An array that the loader allocates but does not return gives its memory
    back once the loader drops it. A loader may also keep one and refill it
    for every batch: the batches the caller already holds never change (the
    first send is in place, later ones are copies). Arrays below 64 KiB,
    and arrays holding Python objects, are always plain `np.empty`: small
    batches go through the worker's socket anyway.

    Args:
        shape: The array's shape: an int or a sequence of ints (NumPy
            integers and 0-d integer arrays too), as for `np.empty`.
        dtype: The array's dtype, anything `np.dtype` accepts. Defaults to
            `float` (float64), as for `np.empty`.
        order: `"C"` (row-major, the default) or `"F"` (column-major), as
            for `np.empty`.

    Returns:
        A writable `np.ndarray`, contiguous in `order`, of `shape` and
        `dtype`, its contents arbitrary.

    Raises:
        TypeError: If `shape` is not an int or a sequence of ints (an
            iterator is not a sequence), `dtype` is not a dtype, or `order`
            is not a string.
        ValueError: If a dimension of `shape` is negative, the array would
            be larger than the address space, or `order` is not `"C"` or
            `"F"`.
        MemoryError: If `np.empty` cannot allocate it.

    Example:

    ```python
    >>> import numpy as np
    >>> from keras_oom import LoaderDataset, batch_array
    >>> def loader(ids):
    ...     out = batch_array((len(ids), 3), np.float32)
    ...     out[:] = np.asarray(ids)[:, None]
    ...     return out
    >>> LoaderDataset(loader, np.arange(4), batch_size=2)[1].tolist()
    [[2.0, 2.0, 2.0], [3.0, 3.0, 3.0]]

    ```
    """
    # NumPy itself decides what the arguments mean: one rule in every
    # process. The allocation is virtual (pages are touched only when
    # written), so making it and dropping it in a worker costs microseconds.
    try:
        template = np.empty(shape, dtype, order=order)
    except (TypeError, ValueError) as e:
        raise type(e)(_refusal(shape, dtype, order, e)) from None
    fortran = template.flags.f_contiguous and not template.flags.c_contiguous
    out = transport.shared_empty(
        template.shape, template.dtype, "F" if fortran else "C"
    )
    return template if out is None else out


def _refusal(shape: Any, dtype: Any, order: Any, error: BaseException) -> str:
    """Why `np.empty` refused `batch_array`'s arguments, naming one of them."""
    try:
        np.dtype(dtype)
    except (TypeError, ValueError):
        return (
            f"`dtype` must be a NumPy dtype, as for np.empty. Received: "
            f"dtype={dtype!r} ({error})"
        )
    try:
        np.empty(0, order=order)
    except (TypeError, ValueError):
        return (
            f"`order` must be 'C' or 'F', as for np.empty. Received: "
            f"order={order!r} ({error})"
        )
    hint = " An iterator is not a sequence: pass tuple(shape)." * isinstance(
        shape, Iterator
    )
    return (
        f"`shape` must be an int or a sequence of ints, none negative, as for "
        f"np.empty. Received: shape={shape!r} with dtype={np.dtype(dtype)} "
        f"({error}).{hint}"
    )


def stack_samples(
    sample_loader: Callable[..., Any], *, threads: int = 1
) -> Callable[..., Any]:
    """Turns a loader of one sample into a loader of batches.

    The batch loader calls `sample_loader(sample_id)` for each id of the
    batch and writes each result into its row of a `batch_array` of shape
    `(len(ids), *sample.shape)` as it arrives, so a batch loaded in a
    `PrefetchLoaderDataset` worker crosses to the caller with no copy.
    Samples may be arrays (or scalars) or tuples or dicts of them, for
    multi-input models: each leaf is stacked into its own array.

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
            structure, shapes and dtypes. It must pickle with `cloudpickle`
            when workers are not forked, as for any loader.
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
    naming the sample id, and a `ValueError` naming two sample ids when
    their samples differ in structure, shape or dtype.

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
    if isinstance(threads, (bool, np.bool_)) or not isinstance(
        threads, (int, np.integer)
    ):
        raise TypeError(
            f"`threads` must be a positive integer. Received: threads={threads!r}"
        )
    if threads < 1:
        raise ValueError(
            f"`threads` must be a positive integer. Received: threads={threads}"
        )
    return StackedSamples(sample_loader, int(threads))


class StackedSamples:
    """The batch loader that `stack_samples` returns."""

    def __init__(self, sample_loader: Callable[..., Any], threads: int) -> None:
        self.sample_loader = sample_loader
        self.threads = threads
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._wants_rng = seeding.accepts_rng(self.sample_loader)
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_pid = -1

    def __getstate__(self) -> dict[str, Any]:
        # The thread pool belongs to the process that made it.
        return {"sample_loader": self.sample_loader, "threads": self.threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

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
                stack.put(k, self._load_one(ids[k], seeds[k], kind))
            return stack.batch()
        results: queue.SimpleQueue[tuple[int, Any, BaseException | None]]
        results = queue.SimpleQueue()

        def task(k: int) -> None:
            try:
                results.put((k, self._load_one(ids[k], seeds[k], kind), None))
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
        except Exception as e:
            add_note(
                e,
                f"keras_oom.stack_samples: raised by sample_loader for sample "
                f"id {_show(sample_id)}",
            )
            raise

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """This process's thread pool, made at its first batch."""
        pid = os.getpid()
        if self._pool_pid != pid:  # none yet, or a fork's copy without threads
            if self._pool_pid != -1:  # the parent's lock may have been held
                self._lock = threading.Lock()
            with self._lock:
                if self._pool_pid != pid:
                    pool = concurrent.futures.ThreadPoolExecutor(
                        self.threads, thread_name_prefix="keras_oom-samples"
                    )
                    # Ends with the loader, or at interpreter exit.
                    weakref.finalize(
                        self, pool.shutdown, wait=False, cancel_futures=True
                    )
                    self._pool, self._pool_pid = pool, pid
        assert self._pool is not None
        return self._pool


class _Stack:
    """The batch being filled: one `batch_array` per leaf of the first sample."""

    def __init__(self, ids: Any) -> None:
        self.ids = ids
        self.first: int | None = None
        self.structure: Any = None
        self.specs: list[tuple[tuple[int, ...], np.dtype]] = []
        self.outs: list[np.ndarray] = []

    def put(self, k: int, sample: Any) -> None:
        structure, leaves = _flatten(sample)
        if self.first is None:
            self.first, self.structure = k, structure
            self.specs = [(a.shape, a.dtype) for a in leaves]
            self.outs = [
                batch_array((len(self.ids), *shape), dtype)
                for shape, dtype in self.specs
            ]
        elif (
            structure != self.structure
            or [(a.shape, a.dtype) for a in leaves] != self.specs
        ):
            raise ValueError(
                f"`stack_samples` needs samples of one structure, shape and "
                f"dtype, but sample id {_show(self.ids[k])} is "
                f"{_describe(structure, leaves)} and sample id "
                f"{_show(self.ids[self.first])} is "
                f"{_describe(self.structure, self.specs)}."
            )
        for out, leaf in zip(self.outs, leaves, strict=True):
            out[k] = leaf

    def batch(self) -> Any:
        return _unflatten(self.structure, iter(self.outs))


def _flatten(sample: Any) -> tuple[Any, list[np.ndarray]]:
    """`(structure, leaves)`: tuples and dicts are nodes, the rest arrays."""
    if isinstance(sample, dict):
        keys = tuple(sample)
        parts = [_flatten(sample[key]) for key in keys]
        return ("dict", keys, tuple(p[0] for p in parts)), [
            leaf for p in parts for leaf in p[1]
        ]
    if isinstance(sample, tuple):
        parts = [_flatten(v) for v in sample]
        return ("tuple", type(sample), tuple(p[0] for p in parts)), [
            leaf for p in parts for leaf in p[1]
        ]
    return None, [np.asarray(sample)]


def _unflatten(structure: Any, leaves: Any) -> Any:
    if structure is None:
        return next(leaves)
    kind, tag, children = structure
    values = [_unflatten(child, leaves) for child in children]
    if kind == "dict":
        return dict(zip(tag, values, strict=True))
    return tuple(values) if tag is tuple else tag(*values)  # a namedtuple


def _describe(structure: Any, leaves: Sequence[Any]) -> str:
    specs = [
        (leaf.shape, leaf.dtype) if isinstance(leaf, np.ndarray) else leaf
        for leaf in leaves
    ]
    text = ", ".join(f"shape {shape} dtype {dtype}" for shape, dtype in specs)
    return text if structure is None else f"{_skeleton(structure)} of ({text})"


def _skeleton(structure: Any) -> str:
    if structure is None:
        return "array"
    kind, tag, children = structure
    inner = ", ".join(_skeleton(c) for c in children)
    if kind == "dict":
        return (
            "{"
            + ", ".join(
                f"{k!r}: {_skeleton(c)}" for k, c in zip(tag, children, strict=True)
            )
            + "}"
        )
    return f"({inner})"


def _show(sample_id: Any) -> str:
    return repr(sample_id.item() if isinstance(sample_id, np.generic) else sample_id)
