"""`PrefetchLoaderDataset`: a `LoaderDataset` that loads ahead in worker processes.

The dataset holds the arguments, Keras's hooks, the lifecycle (first use,
close, copies, forks) and the errors the caller sees. The engine that loads
ahead is `engine.Prefetcher` (engine.py, which draws one read from `ds[i]`
to a worker and back), over an executor: the local process pool
(process_pool.py) unless the dataset is given another.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable
from typing import Any

from keras_oom import stats as stats_module
from keras_oom.checks import (
    as_num_workers,
    as_seconds,
    check_worker_args,
    refuse_keras_parallelism,
)
from keras_oom.dataset import LoaderDataset
from keras_oom.engine import Prefetcher
from keras_oom.errors import for_batch, unusable_error
from keras_oom.executor import Executor
from keras_oom.launch import default_start_method, pickle_setup
from keras_oom.per_process import Owner, PerProcess
from keras_oom.process_pool import ProcessPool
from keras_oom.protocol import (
    WorkerSetup,
    deferred_interrupts,
    describe_ids,
)
from keras_oom.schedule import Key
from keras_oom.state import Update, position_updates, tracker_for


class PrefetchLoaderDataset(LoaderDataset, PerProcess):
    """A `LoaderDataset` whose loader runs ahead in a pool of worker processes.

    `num_workers` processes start at first use (a read, `with`, `set_epoch`,
    `worker_pids`, `stats()`) and serve every epoch until `close()`, keeping
    the next `num_workers` batches of the expected order in flight. Every
    index yields exactly the batch `LoaderDataset` would, in any order.

    Read batches in order to benefit (`fit(ds, shuffle=False)` with the
    dataset's `shuffle=True`, or `repeat=True`); random access still gets
    the right batch, without the head start, and warns once. Loader state
    changed between epochs reaches the workers (`keras_oom.state`). `close()`,
    `with`, the last reference's drop or interpreter exit end the workers.
    Reference: docs/api.md and docs/pool.md.

    Args:
        loader: As for `LoaderDataset`. It must pickle with `cloudpickle`
            (lambdas and closures do) unless workers are forked. A subclass
            may override `load` instead: workers then get a copy of the
            dataset without its sample ids, labels and sample weights.
        sample_ids: As for `LoaderDataset`.
        labels: As for `LoaderDataset`; they stay in this process.
        num_workers: Number of worker processes, reduced (with a warning)
            to the number of batches per epoch when larger.
        timeout: Seconds one batch may take before its worker is replaced and
            a `WorkerTimeoutError` raised; `None` (or `float("inf")`): no limit.
        start_method: How to start workers: `"fork"`, `"subprocess"` (a fresh
            interpreter), `"spawn"` or `"forkserver"`. `None` forks while that
            is safe and starts fresh interpreters once it is not (docs/pool.md
            says when). An explicit `"fork"` forks anyway, with a warning.
        worker_init: Optional callable run once in each worker process before
            its first batch, as `worker_init(index)`, `index` in
            `range(num_workers)` (a replacement's is its predecessor's): the
            place to open what cannot be pickled. If it raises, the next read
            raises that exception and the dataset stops starting workers.
        executor: An unstarted `keras_oom.executor.Executor` to run the
            workers (each dataset and copy starts a copy of it), or `None` for
            the local process pool, the only one `start_method` applies to.
        *args, **kwargs: Every other argument of `LoaderDataset` (`loader`,
            `sample_ids`, `labels` also by position; `sample_weights`,
            `batch_size`, `shuffle`, `seed`, `drop_remainder`, `repeat`,
            `shard`, `shard_mode`, `rows_per_id`).

    Raises:
        TypeError: As for `LoaderDataset`, or for a loader that does not
            pickle (workers not forked) or an `executor` not an `Executor`.
        ValueError: As for `LoaderDataset`, or for `num_workers < 1`,
            `timeout <= 0`, an unknown `start_method` or one with an
            `executor`, or Keras's `workers`, `use_multiprocessing` or
            `max_queue_size` (the pool replaces them).

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
        *args: Any,
        num_workers: int = 2,
        timeout: float | None = None,
        start_method: str | None = None,
        worker_init: Callable[[int], Any] | None = None,
        executor: Executor | None = None,
        **kwargs: Any,
    ) -> None:
        before = set(vars(self))  # a subclass's own attributes, set first
        refuse_keras_parallelism(kwargs)
        # Keras must not stack its own thread or process pool on ours.
        super().__init__(*args, workers=1, use_multiprocessing=False, **kwargs)
        self._num_workers = as_num_workers(num_workers, self._plan.batches_per_epoch)
        self._timeout = as_seconds(timeout, "timeout")
        check_worker_args(start_method, worker_init, executor)
        self._executor = executor
        self._start_method = start_method
        self._worker_init = worker_init
        method = start_method or default_start_method()
        if executor is None and not self._load_overridden() and method != "fork":
            # Fail at construction where we can: the loader is known now.
            pickle_setup(self._worker_setup(), start_method or "subprocess")
        self._init_runtime()
        # The dataset's own machinery: never loader state (see state.py).
        self._internal = frozenset(vars(self)) - before | {"_internal"}

    def _init_runtime(self) -> None:
        """The per-process state, never copied (per_process.PerProcess)."""
        self._lock = threading.RLock()
        self._owner = Owner()
        self._engine: Prefetcher | None = None
        self._closed = False
        # Counted apart from the read lock: stats() never waits for a read.
        self._reads = stats_module.ReadStats()
        self._final_stats: dict[str, Any] | None = None
        self._finalizer: weakref.finalize | None = None

    def _worker_setup(self) -> WorkerSetup:
        if not self._load_overridden():
            assert self._loader is not None
            return WorkerSetup(self._loader, self._worker_init)
        # A subclass's load(): ship a copy of the dataset without its pool
        # and without what workers never read. Not self.load, which would
        # keep self alive through the pool and defeat the finalizer.
        clone = copy.copy(self)
        clone._source = self._source.for_workers()
        return WorkerSetup(clone.load, self._worker_init)

    # -- what Keras calls -----------------------------------------------------

    def __getitem__(self, index: int) -> Any:
        """Returns batch `index`, loaded ahead by a worker when it was expected.

        Batch 0 or 1 read again before batch 2 is a copy, not a new load
        (TensorFlow's adapter reads two batches early to infer shapes).

        Raises:
            IndexError, ValueError: As for `LoaderDataset.__getitem__`.
            DatasetClosedError: If the dataset was closed.
            WorkerDiedError, WorkerTimeoutError, WorkerStartError: If the
                batch's worker died or outlived `timeout`, or none started.
            TypeError: If changed loader state cannot be pickled (naming it).
            RuntimeError: In a forked child of the owning process, or for a
                loader's exception that cannot be rebuilt here (named).
            BaseException: What the loader raised (the worker's traceback in
                its notes and as its cause), or pickling the batch's ids or
                unpickling its result did. The next read is unaffected.
        """
        with self._lock:
            engine = self._ensure_started()
            engine.check_state(self._epoch, self._start)
            epoch, batch = self._locate(index)
            self._passes.read(self._global_index(epoch, batch))
            outcome = engine.get((epoch, batch))
        if outcome.error is not None:
            ids = describe_ids(self._source.ids(epoch, batch))
            index = self._global_index(epoch, batch)
            raise for_batch(outcome.error, index, ids, outcome.pid)
        self._check_rows(outcome.value, epoch, batch)
        return self._source.with_targets(outcome.value, epoch, batch)

    def on_epoch_begin(self) -> None:
        with self._lock:
            self._state_may_change()
            super().on_epoch_begin()

    def on_epoch_end(self) -> None:
        with self._lock:
            self._state_may_change()
            before = self._epoch, self._start
            super().on_epoch_end()
            if (self._epoch, self._start) != before:
                self._moved(before[1])

    def set_epoch(self, epoch: int, batch: int = 0) -> None:
        with self._lock:
            self._state_may_change()
            start = self._start
            super().set_epoch(epoch, batch)
            self._ensure_started()
            self._moved(start)

    def _moved(self, start_before: int) -> None:
        """Index 0 names another batch now: load ahead from there."""
        if self._engine is not None:
            epoch, start, repeat = self._epoch, self._start, self._repeat
            self._engine.move(epoch, start, start_before=start_before, repeat=repeat)

    # -- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        """Ends every worker and releases their resources; idempotent.

        Returns within about a second even while loaders are busy. Reading
        batches afterwards raises `DatasetClosedError`; `stats()` still
        reports the final numbers.
        """
        if self._owner.here() and self._engine is not None:
            self._final_stats = self._report(self._engine)
        # Workers first, without the lock: a thread waiting in ds[i] for a
        # stuck loader holds it, and wakes up (DatasetClosedError) when the
        # pool closes.
        if self._finalizer is not None:
            self._finalizer()
        with self._lock:
            self._closed = True
            if self._engine is not None:
                self._engine.forget()
            self._engine = None

    @property
    def closed(self) -> bool:
        """Whether `close()` has ended the workers."""
        return self._closed

    def __enter__(self) -> PrefetchLoaderDataset:
        with self._lock:
            self._ensure_started()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def num_workers(self) -> int:
        """Number of worker processes (after any reduction)."""
        return self._num_workers

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (starting them if needed)."""
        with self._lock:
            return self._ensure_started().executor.pids

    def stats(self) -> dict[str, Any]:
        """Reports whether training waits for data, why, and what to do.

        Answers at once, also from another thread while a read waits.

        Returns:
            A dict: totals since the workers started (`batches`, `hits`,
            `wait_seconds`, ...), shares of the time since the first batch
            (`wait_share`, `worker_busy_share`, ...), `cores`, `workers` (per
            worker), a `verdict` (one of `stats.VERDICTS`) and a `diagnosis`,
            one sentence with the numbers and the next step. docs/api.md
            describes each key, docs/performance.md each verdict. After
            `close()`, the final numbers.

        Example:

        ```python
        >>> import numpy as np
        >>> from keras_oom import PrefetchLoaderDataset
        >>> with PrefetchLoaderDataset(lambda ids: ids, np.arange(8),
        ...                            batch_size=2) as ds:
        ...     _ = [ds[i] for i in range(len(ds))]
        >>> s = ds.stats()  # also after the with block
        >>> s["batches"], len(s["workers"])
        (4, 2)

        ```
        """
        engine = self._engine
        # First use starts the workers, unless a read is starting them now
        # (it holds the lock): then there is nothing to report, no waiting.
        fresh = engine is None and self._final_stats is None and not self._closed
        if fresh and self._lock.acquire(blocking=False):
            try:
                engine = self._ensure_started()
            finally:
                self._lock.release()
        return self._report(engine)

    def _report(self, engine: Prefetcher | None) -> dict[str, Any]:
        return stats_module.dataset_report(
            self._reads, engine, num_workers=self._num_workers, final=self._final_stats
        )

    # -- scheduling -----------------------------------------------------------

    def _ensure_started(self) -> Prefetcher:
        """The engine, started at first use; raises if it cannot serve."""
        error = unusable_error(self._owner, self._closed)
        if error is not None:
            raise error
        if self._engine is not None:
            self._engine.executor.raise_if_broken()  # at once, even if kept
            return self._engine
        executor = (
            copy.deepcopy(self._executor)  # each dataset starts its own copy
            if self._executor is not None
            else ProcessPool(self._start_method)
        )
        overridden = self._load_overridden()
        engine = Prefetcher(
            executor,
            self._source,
            num_workers=self._num_workers,
            batches_per_epoch=self._plan.batches_per_epoch,
            reads=self._reads,
            # What workers must see change (state.py): a subclass's own
            # attributes and `self.epoch` as when each key is read.
            state=tracker_for(
                self._loader, self if overridden else None, self._internal
            ),
            position_state=self._position_state if overridden else None,
        )
        # Deferred: a Ctrl-C here must leave either no engine (the next read
        # starts one) or an engine that this dataset owns and will close.
        with deferred_interrupts():
            # The executor closes itself if its start raises.
            engine.start(
                self._worker_setup(),
                timeout=self._timeout,
                epoch=self._epoch,
                start=self._start,
            )
            self._engine = engine
            self._finalizer = weakref.finalize(self, executor.close)
        return engine

    # -- loader state between epochs (state.py) -------------------------------

    def _state_may_change(self) -> None:
        """An epoch boundary: look for changed loader state at the next read."""
        if self._engine is not None:
            self._engine.state_may_change()

    def _position_state(self, key: Key) -> tuple[Update, ...]:
        """`_epoch` and `_start` as they will be when `key` is read."""
        return position_updates(key, self._epoch, self._start, self._repeat)
