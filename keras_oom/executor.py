"""What the engine needs from whatever runs loaders: the executor interface.

The engine (`engine.Prefetcher`) decides which batch each worker loads; an
executor runs the workers and reports what happened. The local process pool
(`process_pool.ProcessPool`) is the first executor; a remote one (Ray
actors) plugs in behind the same methods, without engine changes. It is as
small as `concurrent.futures.Executor`, with events in place of futures,
because the engine must know which worker is free, not only which result
is ready.

    engine                                executor        events
      start(setup, num_workers, timeout) -> starts each  -> Joined(w)
      submit(w, Load)                    -> w loads it   -> Arrived(w, key, Outcome)
                                                            or Lost(w, Outcome | None)
      wait(timeout); take_events()       <- the events, oldest first
      kill(w); close()                   -> ends one worker; ends all

The contract:

- Worker indexes are `range(num_workers)`. A worker is *idle* after its
  `Joined` and after each `Arrived`; the engine submits one `Load` only to
  an idle worker, and a submitted load ends in exactly one `Arrived` (its
  batch, or the loader's error as the outcome's error) or one `Lost` (the
  worker is gone: the outcome carries a `WorkerDiedError` or
  `WorkerTimeoutError` for the load, or is None when the load never started
  and must be sent again). A worker lost while idle reports `Lost(w, None)`.
- Events are kept by the executor until `take_events()` takes them, so a
  Ctrl-C between the moment `wait()` read a reply and the moment the engine
  applied it cannot lose it: the next `take_events()` returns it.
- The executor restarts lost workers itself, under the same index (each new
  worker reports `Joined`), pausing between failed starts (0.05 s, doubled
  each time). `MAX_START_FAILURES` failed starts of one index in a row, or a
  failure that cannot change (the loader does not pickle, `worker_init`
  raised), break it: `raise_if_broken()` raises what broke it once, then a
  `WorkerStartError` caused by it, and so do `submit` and `wait`.
- `timeout` (seconds per load, or None) is the executor's to enforce: a load
  that outlives it ends its worker (`kill`) and its `Lost` carries a
  `WorkerTimeoutError`.
- `wait(timeout)` returns when there are events to take, when `timeout`
  seconds pass, or at once when `expecting()` is False (nothing in flight,
  nothing to restart): the engine never waits for nothing.
- `close()` is idempotent and may come from any thread (a finalizer, a
  second thread) while the owner waits: the waiter wakes with
  `DatasetClosedError`, and nothing the executor started outlives `close()`.
  In a fork of the owning process it only lets go of what it inherited.
- All other methods are called by one thread at a time (the engine's lock).

An executor with several loads in flight per remote worker (a Ray actor
with `in_flight=2`) exposes `num_workers * in_flight` worker indexes to the
engine, index `w` running on remote worker `w // in_flight`; when a remote
worker is lost, each of its indexes reports its own `Lost`, and each
`Joined` again once it is back. Such an executor says so with an attribute
`loads_per_worker` (`in_flight`; 1 when absent), which the engine reads
only to widen its read-ahead window to every index; otherwise it keeps
every index busy as it would keep a local process busy.

`worker_stats()`, `pids`, `started_at` and `retired_cpu_seconds` feed
`stats()` (stats.py); an executor whose workers have no local pid reports
the remote one, or 0.

For implementations: `Slots` holds each slot's live worker and whether
the executor is closed, under one lock, so that a worker lost by its owner
and every worker taken by `close()` from another thread is ended exactly
once (the local pool's processes, `RayExecutor`'s actors).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from keras_oom.protocol import Event, Load, WorkerSetup

# Failed starts of one worker index in a row before an executor gives up,
# and the pause before the first retry (doubled each time).
MAX_START_FAILURES = 3
RETRY_PAUSE = 0.05


@runtime_checkable
class Executor(Protocol):
    """Runs a dataset's loader in workers; see the module docstring.

    Built unstarted, with only its own options; `start` is called once.
    """

    started_at: float  # time.perf_counter() when start() began
    retired_cpu_seconds: float  # CPU seconds of workers that are gone

    def start(
        self, setup: WorkerSetup, num_workers: int, *, timeout: float | None = None
    ) -> None:
        """Starts `num_workers` workers with `setup`; `Joined` for each.

        Raises:
            WorkerStartError: (or the error that broke it) If it is broken
                at once; it is then closed.
        """
        ...

    def submit(self, worker_index: int, load: Load) -> None:
        """Sends `load` to idle worker `worker_index`; its end comes as an
        event. Raises `DatasetClosedError` or what broke the executor."""
        ...

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until there are events, `timeout` seconds pass, or nothing
        is expected. Raises `DatasetClosedError` if closed meanwhile."""
        ...

    def take_events(self) -> list[Event]:
        """The events not yet taken, oldest first."""
        ...

    def expecting(self) -> bool:
        """Whether `wait()` has anything to wait for."""
        ...

    def kill(self, worker_index: int) -> None:
        """Ends worker `worker_index` now; it is reported `Lost` and
        restarted like any worker that died."""
        ...

    def close(self) -> None:
        """Ends every worker; idempotent, from any thread."""
        ...

    def raise_if_broken(self) -> None:
        """Raises what broke the executor, if anything did."""
        ...

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per live worker: `index` (its worker index), `pid`, `batches`,
        `busy_seconds`, `cpu_seconds`."""
        ...

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        ...

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        ...


W = TypeVar("W")


class Slots(Generic[W]):
    """Which worker holds each slot, and whether the executor is closed.

    The one rule both executors keep so that nothing is ended twice or
    used after it ended: whoever takes a worker out of its slot ends it.
    The owner takes one it lost (`take`); `close()`, from any thread,
    takes them all; a worker started after `close()` is refused (`put`)
    and its starter ends it. A slot is a worker index of the local pool,
    an actor of `RayExecutor`.

    Args:
        size: Slots, `range(size)`, all vacant.
    """

    def __init__(self, size: int = 0) -> None:
        self._items: list[W | None] = [None] * size
        self.closed = False
        # Guards the slots against close() from another thread (or a
        # finalizer) while the owner replaces a worker.
        self.lock = threading.Lock()

    def resize(self, size: int) -> None:
        """Makes `range(size)` the slots, all vacant (at `start`)."""
        with self.lock:
            self._items = [None] * size

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, slot: int) -> W | None:
        return self._items[slot]

    def __iter__(self) -> Iterator[W | None]:
        return iter(list(self._items))

    def live(self) -> list[W]:
        """The workers in their slots, by slot."""
        return [w for w in self._items if w is not None]

    def put(self, slot: int, worker: W) -> bool:
        """Puts `worker` in `slot`; False if closed (the caller ends it)."""
        with self.lock:
            if self.closed:
                return False
            self._items[slot] = worker
            return True

    def take(self, slot: int, worker: W) -> bool:
        """Takes `worker` out of `slot`; False if it is not there (closed
        meanwhile: `close()` took it, and ends it)."""
        with self.lock:
            if self._items[slot] is not worker:
                return False
            self._items[slot] = None
            return True

    def close(self) -> list[W]:
        """Marks the slots closed and takes every worker, for the caller to
        end; none if closed already."""
        with self.lock:
            if self.closed:
                return []
            self.closed = True
            live = self.live()
            self._items = [None] * len(self._items)
        return live
