"""`PrefetchLoaderDataset`: a `LoaderDataset` that loads ahead in worker processes."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_oom.dataset import Labels, LoaderDataset, _as_index
from keras_oom.errors import (
    DatasetClosedError,
    WorkerDiedError,
    WorkerTimeoutError,
    add_note,
    describe_ids,
)
from keras_oom.pool import START_METHODS, Completion, WorkerPool

Key = tuple[int, int]  # (epoch, 0 for all unshuffled epochs; batch in the epoch)

# Out-of-order requests within one epoch before we warn: one jump (a peek at
# ds[5]) is fine; a shuffled batch order is not.
_OUT_OF_ORDER_WARN_AFTER = 2
_RECENT_BATCHES = 2  # batches 0 and 1 of an epoch are kept for a re-read


class PrefetchLoaderDataset(LoaderDataset):
    """A `LoaderDataset` whose loader runs ahead in a pool of worker processes.

    `num_workers` processes are started when the dataset is built and serve
    every epoch until `close()`. Each loads one batch at a time; together
    they keep the next `num_workers` batches of the expected order in flight,
    across epoch boundaries too, so a `fit` loop that reads batches in order
    finds them ready. Every index yields exactly the batch that
    `LoaderDataset` would, in any request order and for any `num_workers`.

    Read batches in order to benefit: call `fit(ds, shuffle=False)` and let
    the dataset shuffle the samples (`shuffle=True`, a better shuffle than
    Keras's batch-order shuffle), or use `repeat=True` with
    `steps_per_epoch=ds.batches_per_epoch`. Random access still returns the
    right batch, only without the head start; the dataset warns once when it
    sees it.

    Close the dataset to end its workers: use it in a `with` block, or call
    `close()`. Dropping the last reference and interpreter exit close it too.

    Args:
        loader: As for `LoaderDataset`. It must pickle with `cloudpickle`
            (lambdas and closures do) unless workers are forked.
        sample_ids: As for `LoaderDataset`.
        labels: As for `LoaderDataset`. Labels stay in this process; workers
            only run the loader.
        num_workers: Number of worker processes, reduced (with a warning)
            to `len(sample_ids) // batch_size` when larger.
        timeout: Seconds one batch may take before its worker is killed and
            replaced and a `WorkerTimeoutError` raised, or `None` to wait
            without limit.
        start_method: How to start workers: `"fork"`, `"subprocess"` (a fresh
            interpreter), `"spawn"` or `"forkserver"`. `None` forks while that
            is safe and starts fresh interpreters once JAX, TensorFlow or CUDA
            has started threads; see docs/pool.md.
        batch_size: As for `LoaderDataset`.
        shuffle: As for `LoaderDataset`.
        seed: As for `LoaderDataset`.
        drop_remainder: As for `LoaderDataset`.
        repeat: As for `LoaderDataset`.
        shard: As for `LoaderDataset`.
        shard_mode: As for `LoaderDataset`.

    Raises:
        TypeError: For a bad argument type, as for `LoaderDataset`, or for
            a loader that cannot be pickled when workers are not forked.
        ValueError: For a bad argument value, as for `LoaderDataset`, or for
            `num_workers < 1`, `timeout <= 0`, or an unknown `start_method`.

    Example:

    ```python
    >>> import numpy as np
    >>> from keras_oom import PrefetchLoaderDataset
    >>> with PrefetchLoaderDataset(lambda ids: ids * 10, np.arange(6),
    ...                            batch_size=2, num_workers=2) as ds:
    ...     [ds[i].tolist() for i in range(len(ds))]
    [[0, 10], [20, 30], [40, 50]]

    ```
    """

    def __init__(
        self,
        loader: Callable[[np.ndarray], Any] | None = None,
        sample_ids: Any = None,
        labels: Labels = None,
        *,
        num_workers: int = 2,
        timeout: float | None = None,
        start_method: str | None = None,
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int | None = None,
        drop_remainder: bool = False,
        repeat: bool = False,
        shard: tuple[int, int] | str | None = None,
        shard_mode: str = "pad",
    ) -> None:
        # Keras must not stack its own thread or process pool on ours.
        super().__init__(
            loader,
            sample_ids,
            labels,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_remainder=drop_remainder,
            repeat=repeat,
            shard=shard,
            shard_mode=shard_mode,
            workers=1,
            use_multiprocessing=False,
        )
        num_workers = _check_num_workers(num_workers)
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise TypeError(
                    f"`timeout` must be a number of seconds or None. "
                    f"Received: timeout={timeout!r}"
                )
            if not timeout > 0:
                raise ValueError(
                    f"`timeout` must be positive. Received: timeout={timeout}"
                )
        if start_method is not None and start_method not in START_METHODS:
            raise ValueError(
                f"`start_method` must be one of {START_METHODS} or None. "
                f"Received: start_method={start_method!r}"
            )
        n = self._plan.shard_samples
        if num_workers * self.batch_size > n:
            reduced = max(1, n // self.batch_size)
            warnings.warn(
                f"num_workers reduced from {num_workers} to {reduced}: "
                f"{num_workers} workers x batch_size {self.batch_size} exceeds "
                f"the {n} samples.",
                UserWarning,
                stacklevel=2,
            )
            num_workers = reduced
        self._num_workers = num_workers
        self._lock = threading.RLock()
        self._pending: set[Key] = set()  # submitted, not yet back
        self._ready: dict[Key, Completion] = {}  # back, not yet requested
        # TensorFlow's adapter reads batches 0 and 1 to infer shapes, then
        # again to train: keep an epoch's first batches until batch 2 is read.
        self._recent: dict[Key, Completion] = {}
        self._last_key: Key | None = None
        self._out_of_order = (0, 0)  # (epoch, count)
        self._warned_order = False
        self._counters = dict.fromkeys(
            ("batches", "hits", "discarded", "wait_seconds", "load_seconds"), 0.0
        )
        self._pool: WorkerPool | None = WorkerPool(
            self._worker_target(),
            num_workers,
            start_method=start_method,
            timeout=timeout,
        )
        self._finalizer = weakref.finalize(self, self._pool.close)
        with self._lock:
            self._fill(None)

    def _worker_target(self) -> Callable[[np.ndarray], Any]:
        if type(self).load is LoaderDataset.load:
            assert self._loader is not None
            return self._loader
        # A subclass's load(): ship a copy of the dataset without its pool.
        # Not self.load, which would keep self alive through the pool and so
        # defeat the finalizer that closes it.
        return copy.copy(self).load

    # -- what Keras calls -----------------------------------------------------

    def __getitem__(self, index: int) -> Any:
        """Returns batch `index`, loaded ahead by a worker when it was expected.

        Asking again for batch 0 or 1 of the epoch before batch 2 returns a
        copy of them instead of loading them again (TensorFlow's adapter
        reads two batches early to infer shapes).

        Raises:
            IndexError: If `index` is out of range.
            DatasetClosedError: If the dataset was closed.
            WorkerDiedError: If the worker loading the batch died.
            WorkerTimeoutError: If the batch took longer than `timeout`.
            Exception: Whatever the loader raised, with the worker's
                traceback as its cause.
        """
        with self._lock:
            pool = self._check_open()
            epoch, batch = self._locate(index)
            key = self._key(epoch, batch)
            self._note_order(key)
            start = time.perf_counter()
            completion = self._take(pool, key)
            self._counters["wait_seconds"] += time.perf_counter() - start
            self._counters["batches"] += 1
            self._counters["load_seconds"] += completion.seconds
            self._last_key = key
            self._fill(key)
        if completion.error is not None:
            self._raise(completion, self._global_index(epoch, batch))
        return self._with_labels(completion.value, epoch, batch)

    def on_epoch_end(self) -> None:
        with self._lock:
            super().on_epoch_end()

    def set_epoch(self, epoch: int) -> None:
        with self._lock:
            super().set_epoch(epoch)
            if self._pool is not None:
                self._last_key = None
                self._fill(None)

    # -- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        """Ends every worker and releases their resources; idempotent.

        Returns within about a second even while loaders are busy. Using the
        dataset afterwards raises `DatasetClosedError`.
        """
        # Workers first, without the lock: a thread waiting in ds[i] for a
        # stuck loader holds it, and wakes up (DatasetClosedError) when the
        # pool closes.
        self._finalizer()
        with self._lock:
            self._pool = None
            self._pending.clear()
            self._ready.clear()
            self._recent.clear()

    @property
    def closed(self) -> bool:
        """Whether `close()` has ended the workers."""
        return self._pool is None

    def __enter__(self) -> PrefetchLoaderDataset:
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def num_workers(self) -> int:
        """Number of worker processes (after any reduction)."""
        return self._num_workers

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers."""
        return self._check_open().pids

    def stats(self) -> dict[str, Any]:
        """Reports whether training waits for data, and how busy workers are.

        Returns:
            A dict with `batches` (delivered), `hits` (of those, how many were
            already loaded when requested), `discarded` (loaded ahead but not
            used, e.g. after random access), `wait_seconds` (time the caller
            spent waiting in `ds[i]`), `load_seconds` (loader time of the
            delivered batches), `elapsed_seconds` (since the workers started)
            and `workers`: per worker `pid`, `batches`, `busy_seconds` and
            `utilization` (busy share of the elapsed time). When
            `wait_seconds` is a large share of your step time, training is
            input-bound: add workers or speed up the loader.

        Example:

        ```python
        >>> import numpy as np
        >>> from keras_oom import PrefetchLoaderDataset
        >>> with PrefetchLoaderDataset(lambda ids: ids, np.arange(8),
        ...                            batch_size=2) as ds:
        ...     _ = [ds[i] for i in range(len(ds))]
        ...     s = ds.stats()
        >>> s["batches"], len(s["workers"])
        (4, 2)

        ```
        """
        with self._lock:
            pool = self._check_open()
            elapsed = time.perf_counter() - pool.started_at
            workers = pool.worker_stats()
            for w in workers:
                w["utilization"] = w["busy_seconds"] / elapsed if elapsed else 0.0
            out: dict[str, Any] = {
                k: (int(v) if k in ("batches", "hits", "discarded") else v)
                for k, v in self._counters.items()
            }
            out["elapsed_seconds"] = elapsed
            out["workers"] = workers
            return out

    # -- scheduling -----------------------------------------------------------

    def _check_open(self) -> WorkerPool:
        if self._pool is None:
            raise DatasetClosedError(
                "This PrefetchLoaderDataset was closed: its worker processes "
                "are gone. Build a new dataset to load more batches."
            )
        return self._pool

    def _take(self, pool: WorkerPool, key: Key) -> Completion:
        """Returns the completion of `key`, submitting it first if needed."""
        kept = self._recent.get(key)
        if kept is not None:
            self._counters["hits"] += 1
            return dataclasses.replace(kept, value=copy.deepcopy(kept.value))
        completion = self._take_new(pool, key)
        if key[1] >= _RECENT_BATCHES:
            self._recent.clear()  # past the early reads: let those copies go
        elif completion.error is None:
            # A copy, so that a caller normalising the batch in place does
            # not change what a re-read returns.
            with contextlib.suppress(Exception):
                self._recent[key] = dataclasses.replace(
                    completion, value=copy.deepcopy(completion.value)
                )
        return completion

    def _take_new(self, pool: WorkerPool, key: Key) -> Completion:
        # Collect what has already arrived: it frees those workers for the
        # next batches, and tells a batch loaded ahead from one waited for.
        self._collect(pool.wait(0))
        if key in self._ready:
            self._counters["hits"] += 1
            return self._ready.pop(key)
        if key not in self._pending:
            while pool.idle_count() == 0:
                pool.raise_if_broken()  # no worker will come back
                self._collect(pool.wait())
            self._submit(pool, key)
            self._fill(key)  # idle workers start on what comes next
        while key not in self._ready:
            self._collect(pool.wait())
        return self._ready.pop(key)

    def _collect(self, completions: list[Completion]) -> None:
        for c in completions:
            self._pending.discard(c.key)
            self._ready[c.key] = c

    def _submit(self, pool: WorkerPool, key: Key) -> None:
        ids = self._sample_ids[self._plan.positions(*key)]
        pool.submit(key, ids)
        self._pending.add(key)

    def _fill(self, anchor: Key | None) -> None:
        """Keeps the `num_workers` batches after `anchor` loaded or loading.

        Results outside that window (random access, a finished epoch) are
        dropped, which bounds memory to the window plus the batch in use.
        """
        pool = self._pool
        if pool is None:
            return
        window = self._window(anchor)
        for key in [k for k in self._ready if k not in window]:
            del self._ready[key]
            self._counters["discarded"] += 1
        for key in window:
            if pool.idle_count() == 0:
                break
            if not (key in self._ready or key in self._pending or key in self._recent):
                self._submit(pool, key)

    def _window(self, anchor: Key | None) -> list[Key]:
        per_epoch = self._plan.batches_per_epoch
        if anchor is None:
            epoch, batch = self._epoch, -1
        else:
            epoch, batch = anchor
        keys = []
        for _ in range(self._num_workers):
            batch += 1
            if batch == per_epoch:
                epoch, batch = epoch + 1, 0
            keys.append(self._key(epoch, batch))
        return keys

    def _key(self, epoch: int, batch: int) -> Key:
        """Names a batch by what it holds: unshuffled epochs are all alike, so
        a batch loaded ahead for one epoch serves the next (Keras ends an
        epoch before every `evaluate`)."""
        return (epoch if self._plan.shuffle else 0, batch)

    def _note_order(self, key: Key) -> None:
        last = self._last_key
        if last is None or key == last or key[1] == 0 or key == self._window(last)[0]:
            return
        epoch, count = self._out_of_order
        count = count + 1 if epoch == key[0] else 1
        self._out_of_order = (key[0], count)
        if count >= _OUT_OF_ORDER_WARN_AFTER and not self._warned_order:
            self._warned_order = True
            warnings.warn(
                f"PrefetchLoaderDataset: batches are requested out of order "
                f"(batch {key[1]} after batch {last[1]}), so its workers load "
                f"batches that are not used next. Keras's fit() shuffles the "
                f"batch order by default: call fit(..., shuffle=False) and "
                f"build the dataset with shuffle=True (it shuffles samples, a "
                f"better shuffle), or use repeat=True with "
                f"steps_per_epoch=ds.batches_per_epoch.",
                UserWarning,
                stacklevel=3,
            )

    def _raise(self, completion: Completion, index: int) -> None:
        error = completion.error
        assert error is not None
        ids = describe_ids(self._sample_ids[self._plan.positions(*completion.key)])
        what = f"batch {index}, ids {ids}"
        # The pool's messages already name the worker's pid.
        if isinstance(error, WorkerDiedError):
            raise WorkerDiedError(
                f"{error} It was loading {what}.",
                pid=error.pid,
                exitcode=error.exitcode,
                batch_index=index,
            ) from None
        if isinstance(error, WorkerTimeoutError):
            raise WorkerTimeoutError(f"{error} It was loading {what}.") from None
        add_note(
            error, f"keras_oom: while loading {what}, in worker pid {completion.pid}"
        )
        raise error

    # -- pickling: a copy for the workers, without the pool -------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_pool", "_finalizer", "_lock", "_pending", "_ready", "_recent"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pool = None  # an unpickled copy only loads; it owns no workers
        self._lock = threading.RLock()
        self._pending, self._ready, self._recent = set(), {}, {}
        self._finalizer = weakref.finalize(self, lambda: None)


def _check_num_workers(num_workers: Any) -> int:
    value = _as_index(num_workers, "num_workers")
    if value < 1:
        raise ValueError(
            f"`num_workers` must be at least 1. Received: num_workers={num_workers}"
        )
    return value
