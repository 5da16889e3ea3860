"""The local executor: a fixed pool of worker processes, one batch each.

`ProcessPool` implements the executor interface (executor.py) with worker
processes on this machine. Data flow (parent on the left, one worker on the
right):

    engine (engine.py)                          worker process (worker.py)
      | decides which worker loads which key     |
      v                                          |
    ProcessPool.submit(worker_index, Load) -- socket --> loader(ids[, rng])
      | one process per worker index, or vacant  |
      | wait(): multiprocessing.connection.wait  |
      |   over every socket and process          |
      |   sentinel, the nearest timeout and      |
      |   the next restart of a vacant index     |
      v                                          |
    take_events():                               |
      Arrived(worker_index, key, Outcome) <-- Loaded | Failed (protocol.py)
      Lost(worker_index, Outcome | None)      array data via memfd
      Joined(worker_index)                    (transport.py)

- The engine sends a worker a request only when it is idle, so each
  worker has at most one batch in flight; the pool knows only *that* a
  worker is busy (for `timeout`), the engine's schedule knows *which* key.
- One rule for every failure: it ends the batch it affects with an error
  for that batch, and the pool restarts the worker. A loader exception and
  a batch that does not unpickle come back as `Arrived` with an error; a
  worker that dies or outlives `timeout` as `Lost` with a
  `WorkerDiedError` or `WorkerTimeoutError`.
- A worker that cannot be started (the start raises, or it dies before it
  is ready) is retried with a growing pause; `MAX_START_FAILURES` failures
  of one index in a row break the pool, and every later call raises at
  once (`WorkerStartError`). A start that fails for a reason that cannot
  change (the loader does not pickle, `worker_init` raised) breaks it at
  once. So nothing spins and nothing waits forever.
- Workers are started once, at the dataset's first use, and serve every
  epoch. How they start is launch.py's; their process handles are
  processes.py's; what the pool knows of each, and how its reply becomes
  an `Outcome`, pool_worker.py's.

How a pool ends, and what handles each case (close, a death, a timeout, a
fork, the parent's death, Ctrl-C): pool_shutdown.py, beside the code that
ends workers.
"""

from __future__ import annotations

import contextlib
import time
from multiprocessing.connection import wait
from typing import Any

from keras_oom.errors import DatasetClosedError, WorkerStartError, loss_error
from keras_oom.executor import Slots
from keras_oom.launch import (
    START_METHODS,
    Launcher,
    Unpicklable,
    died_starting,
    exit_if_reimporting_main,
)
from keras_oom.per_process import Owner
from keras_oom.pool_shutdown import release, stop
from keras_oom.pool_worker import PoolWorker
from keras_oom.processes import close_conn
from keras_oom.protocol import (
    Arrived,
    Event,
    Failed,
    Joined,
    Load,
    Loaded,
    Lost,
    Outcome,
    Ready,
    StartFailed,
    WorkerSetup,
    add_note,
    decode_error,
    deferred_interrupts,
)
from keras_oom.restarts import Restarts

__all__ = ["START_METHODS", "ProcessPool"]

# select() and its kin overflow past ~24.8 days; waits are cut into pieces.
_MAX_WAIT = 3600.0
# A worker given up on (its stream broke) is usually exiting: how long to
# wait for its exit code before ending it.
_LOSE_GRACE = 1.0


class ProcessPool:
    """The local executor: `num_workers` processes that run the loader.

    Implements `executor.Executor`. Not thread-safe except for `close()`:
    the engine serialises the other calls with its lock.

    Args:
        start_method: One of `START_METHODS`, or `None` to pick per start
            with `launch.default_start_method()`.
    """

    def __init__(self, start_method: str | None = None) -> None:
        self.start_method = start_method
        self._launcher: Launcher | None = None
        self._timeout: float | None = None
        # Each worker index's live worker; whoever takes one out ends it.
        self._workers: Slots[PoolWorker] = Slots()
        self._restarts = Restarts()
        self.retired_cpu_seconds = 0.0  # of workers that are gone, for stats
        self._events: list[Event] = []  # until take_events()
        self.started_at = time.perf_counter()
        self._owner = Owner()

    def start(
        self, setup: WorkerSetup, num_workers: int, *, timeout: float | None = None
    ) -> None:
        """Starts `num_workers` workers (`Joined` for each, in `take_events`).

        Raises:
            WorkerStartError: (or the error that broke it) If the pool broke
                at once; it is closed then, as after any exception here.
        """
        exit_if_reimporting_main()
        self._launcher = Launcher(setup, self.start_method)
        self._timeout = timeout
        self._workers.resize(num_workers)
        self._restarts = Restarts(num_workers)
        self.started_at = time.perf_counter()
        try:
            for worker_index in range(num_workers):
                self._fill(worker_index)
            self.raise_if_broken()
        except BaseException:
            self.close()  # no worker may outlive a start that raised
            raise

    def take_events(self) -> list[Event]:
        """The events since the last call, oldest first (kept until taken)."""
        events, self._events = self._events, []
        return events

    # -- starting workers ---------------------------------------------------

    def _fill(self, worker_index: int) -> None:
        """Starts worker `worker_index`, recording a failure if it fails."""
        if self._workers.closed or self._restarts.broken is not None:
            return
        assert self._launcher is not None
        try:
            process, conn = self._launcher.start(worker_index)
        except Unpicklable as e:
            self._restarts.break_(e.error)
            return
        except Exception as e:
            self._restarts.failed(worker_index, e)
            return
        try:
            new = PoolWorker(worker_index, process, conn)
        except Exception as e:
            # The process exists: a start that fails now must end it.
            close_conn(conn)
            process.close()
            self._restarts.failed(worker_index, e)
            return
        if not self._workers.put(worker_index, new):
            stop([new])  # closed from another thread meanwhile
            return
        self._events.append(Joined(worker_index))

    # -- requests -----------------------------------------------------------

    def submit(self, worker_index: int, load: Load) -> None:
        """Sends `load` to idle worker `worker_index`; its end comes as an event.

        `load.ids` is already pickled (`protocol.pack_ids`), so nothing here
        runs the user's code: once the checks pass, the worker is marked busy
        and the request goes out, or the worker's death reports it (`Lost`).

        Raises:
            DatasetClosedError: If the pool was closed.
            WorkerStartError: (or the error that broke it) If broken.
                Either way nothing was sent, and every later call raises too.
        """
        self._check_open()
        self.raise_if_broken()
        w = self._workers[worker_index]
        assert w is not None and not w.busy, f"worker {worker_index} is not idle"
        w.busy = True
        if w.ready:
            w.started = time.perf_counter()
        released = w.reader.take_released()
        with contextlib.suppress(OSError):  # if it died, wait() reports it Lost
            w.conn.send(load._replace(released=released))

    def wait(self, timeout: float | None = None) -> None:
        """Waits until something happens, or `timeout` seconds pass.

        What happened is kept for `take_events()`; with events not yet
        taken, it returns at once.
        """
        self._check_open()
        self.raise_if_broken()
        with deferred_interrupts():
            self._refill()
        if self._events or not self.expecting():
            return
        live = self._workers.live()
        vacant = [i for i, w in enumerate(self._workers) if w is None]
        deadlines = [self._restarts.seconds_until(i) for i in vacant]
        if self._timeout is not None:
            now = time.perf_counter()
            deadlines += [w.deadline(self._timeout) - now for w in live if w.busy]
        if timeout is not None:
            deadlines.append(timeout)
        limit = min([_MAX_WAIT, *deadlines])
        by_handle: dict[Any, PoolWorker] = {}
        for w in live:
            by_handle[w.conn] = w
            by_handle[w.process.sentinel] = w
        ready = wait(list(by_handle), max(0.0, limit))
        self._check_open()  # close() from another thread wakes us up
        with deferred_interrupts():
            dead: list[PoolWorker] = []
            for handle in ready:
                w = by_handle[handle]
                if w not in dead and not self._drain(w):
                    dead.append(w)
            for w in dead:
                self._lose(w)
            if self._timeout is not None:
                now = time.perf_counter()
                for w in self._workers.live():
                    if w.busy and now >= w.deadline(self._timeout):
                        self._lose(w, timed_out=True)
            self._refill()

    def expecting(self) -> bool:
        """Whether `wait()` has something to wait for: a batch in flight, or
        a vacant worker index to restart."""
        return any(w is None or w.busy for w in self._workers)

    def kill(self, worker_index: int) -> None:
        """Kills worker `worker_index` and what its loader started; the next
        `wait()` reports it `Lost` (its batch with a `WorkerDiedError`) and
        starts a new worker in its place."""
        w = self._workers[worker_index]
        if w is not None:
            w.process.kill()

    def _refill(self) -> None:
        for worker_index, w in enumerate(self._workers):
            if w is None and self._restarts.due(worker_index):
                self._fill(worker_index)

    def _drain(self, w: PoolWorker) -> bool:
        """Reads every message `w` has sent; False if `w` is gone.

        Runs with SIGINT deferred (`wait`), so any exception here comes from
        the stream or from the messages, never from Ctrl-C.
        """
        try:
            while w.conn.poll():
                self._handle(w, w.conn.recv())
            return w.process.exitcode is None or w.conn.poll()
        except BaseException:
            # End of file, a broken socket, a descriptor that never came, a
            # message that does not unpickle: the stream cannot be trusted.
            return False

    def _handle(self, w: PoolWorker, msg: Any) -> None:
        if isinstance(msg, Ready):
            w.ready = True
            w.started = time.perf_counter()  # `timeout` counts loading only
            self._restarts.started(w.worker_index)
        elif isinstance(msg, StartFailed):
            error = decode_error(msg.error, f"{w} while starting")
            add_note(error, "keras_oom: the pool cannot start workers; it is broken")
            self._restarts.break_(error)
        elif isinstance(msg, (Failed, Loaded)):
            outcome = w.finished(msg)
            self._events.append(Arrived(w.worker_index, msg.key, outcome))
        else:
            raise TypeError(f"unexpected message from a worker: {msg!r}")

    def _lose(self, w: PoolWorker, *, timed_out: bool = False) -> None:
        """Ends `w`, fails its batch, and starts a worker in its place."""
        # Whoever takes `w` out of its slot ends it: this call, or close()
        # from another thread. Never both, so no descriptor is closed twice
        # (a second close could hit a reused number) and no process handle
        # is used after it was closed.
        if not self._workers.take(w.worker_index, w):
            return  # closed meanwhile: the caller gets DatasetClosedError
        if timed_out:
            w.process.kill()
        # A worker whose socket broke is usually exiting: give it a moment,
        # for its exit code. One still running after that has only stopped
        # answering, and its stream cannot be trusted: release() ends it.
        w.process.join(_LOSE_GRACE)
        exitcode = w.process.exitcode
        release(w)
        if not w.ready and not timed_out:
            error = died_starting(
                str(w), w.worker_index, w.pid, exitcode, self.start_method
            )
            if isinstance(error, WorkerStartError):
                self._restarts.break_(error)
            else:
                self._restarts.failed(w.worker_index, error)
        self.retired_cpu_seconds += w.cpu_seconds
        outcome = None
        # A worker that died before it was ready never started on its batch,
        # and a broken pool raises what broke it at the next call: either
        # way the batch goes back to be sent again, and the start failure
        # (e.g. from worker_init) decides what the caller sees.
        if w.busy and (w.ready or timed_out) and self._restarts.broken is None:
            error = loss_error(w.pid, exitcode, timed_out, self._timeout)
            outcome = Outcome(error=error, pid=w.pid)
        self._events.append(Lost(w.worker_index, outcome))
        if self._restarts.due(w.worker_index):
            self._fill(w.worker_index)

    def raise_if_broken(self) -> None:
        """Raises what broke the pool: its own error once, then a
        `WorkerStartError` caused by it."""
        self._restarts.raise_if_broken()

    def _check_open(self) -> None:
        if self._workers.closed:
            raise DatasetClosedError("The dataset's worker pool was closed.")

    # -- observability and shutdown -----------------------------------------

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per live worker: index, pid, batches loaded and seconds loading."""
        return [w.stats() for w in self._workers.live()]

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers.live()]

    @property
    def closed(self) -> bool:
        return self._workers.closed

    def close(self) -> None:
        """Ends every worker and releases every socket; idempotent.

        Returns within about a second, even while loaders are busy.
        """
        workers = self._workers.close()  # none if closed already
        if not self._owner.here():
            # A copy in a forked child (the user's os.fork()): the workers
            # belong to the parent; only let go of the inherited descriptors.
            for w in workers:
                close_conn(w.conn)
                w.process.forget()
            return
        stop(workers)
