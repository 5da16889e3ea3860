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
  processes.py's.

How a pool ends, and what handles each case (close, a death, a timeout, a
fork, the parent's death, Ctrl-C): pool_shutdown.py, beside the code that
ends workers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from keras_oom.errors import (
    DatasetClosedError,
    WorkerStartError,
    describe_exit,
    loss_error,
)
from keras_oom.launch import (
    MAIN_REIMPORT_EXIT,
    START_METHODS,
    Launcher,
    Unpicklable,
    exit_if_reimporting_main,
    main_reimport_message,
    reimport_hint,
)
from keras_oom.per_process import Owner
from keras_oom.pool_shutdown import release, stop
from keras_oom.processes import Process, close_conn
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
from keras_oom.transport import BatchReader

__all__ = ["START_METHODS", "ProcessPool"]

# A worker's start-up (a fresh interpreter importing what the loader needs)
# does not count against `timeout`; this bounds it instead.
_START_GRACE = 60.0
# select() and its kin overflow past ~24.8 days; waits are cut into pieces.
_MAX_WAIT = 3600.0
# A worker given up on (its stream broke) is usually exiting: how long to
# wait for its exit code before ending it.
_LOSE_GRACE = 1.0


class _Worker:
    def __init__(self, worker_index: int, process: Process, conn: Connection) -> None:
        self.worker_index = worker_index
        self.process = process
        self.conn = conn
        self.pid: int = process.pid
        self.busy = False  # a load in flight (which one: the engine knows)
        self.ready = False  # has run its setup and is serving
        self.started = time.perf_counter()  # of start-up, then of the batch
        self.batches = 0
        self.busy_seconds = 0.0
        self.cpu_seconds = 0.0  # as the worker last reported it
        self.reader = BatchReader()
        self.released = False

    def __str__(self) -> str:
        return f"worker {self.worker_index} (pid {self.pid})"


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
        self._closed = False
        self._workers: list[_Worker | None] = []
        self._restarts = Restarts()
        self.retired_cpu_seconds = 0.0  # of workers that are gone, for stats
        self._events: list[Event] = []  # until take_events()
        # Guards the workers against close() from another thread (or a
        # finalizer) while the owner replaces one.
        self._state_lock = threading.Lock()
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
        self._workers = [None] * num_workers
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
        if self._closed or self._restarts.broken is not None:
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
            new = _Worker(worker_index, process, conn)
        except Exception as e:
            # The process exists: a start that fails now must end it.
            close_conn(conn)
            process.close()
            self._restarts.failed(worker_index, e)
            return
        with self._state_lock:
            accepted = not self._closed  # else closed from another thread
            if accepted:
                self._workers[worker_index] = new
        if not accepted:
            stop([new])
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
        live = [w for w in self._workers if w is not None]
        vacant = [i for i, w in enumerate(self._workers) if w is None]
        deadlines = [self._restarts.seconds_until(i) for i in vacant]
        if self._timeout is not None:
            now = time.perf_counter()
            deadlines += [self._deadline(w) - now for w in live if w.busy]
        if timeout is not None:
            deadlines.append(timeout)
        limit = min([_MAX_WAIT, *deadlines])
        by_handle: dict[Any, _Worker] = {}
        for w in live:
            by_handle[w.conn] = w
            by_handle[w.process.sentinel] = w
        ready = wait(list(by_handle), max(0.0, limit))
        self._check_open()  # close() from another thread wakes us up
        with deferred_interrupts():
            dead: list[_Worker] = []
            for handle in ready:
                w = by_handle[handle]
                if w not in dead and not self._drain(w):
                    dead.append(w)
            for w in dead:
                self._lose(w)
            if self._timeout is not None:
                now = time.perf_counter()
                for w in [w for w in self._workers if w is not None]:
                    if w.busy and now >= self._deadline(w):
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

    def _drain(self, w: _Worker) -> bool:
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

    def _handle(self, w: _Worker, msg: Any) -> None:
        if isinstance(msg, Ready):
            w.ready = True
            w.started = time.perf_counter()  # `timeout` counts loading only
            self._restarts.started(w.worker_index)
            return
        if isinstance(msg, StartFailed):
            error = decode_error(msg.error, f"{w} while starting")
            add_note(error, "keras_oom: the pool cannot start workers; it is broken")
            self._restarts.break_(error)
            return
        if isinstance(msg, Failed):
            outcome = Outcome(error=decode_error(msg.error, str(w)))
        elif isinstance(msg, Loaded):
            outcome = _receive(w, msg)
        else:
            raise TypeError(f"unexpected message from a worker: {msg!r}")
        outcome.seconds, outcome.pid = msg.seconds, w.pid
        w.cpu_seconds = msg.cpu
        w.busy = False
        w.batches += 1
        w.busy_seconds += msg.seconds
        self._events.append(Arrived(w.worker_index, msg.key, outcome))

    def _lose(self, w: _Worker, *, timed_out: bool = False) -> None:
        """Ends `w`, fails its batch, and starts a worker in its place."""
        # Whoever takes `w` out of the list ends it: this call, or close()
        # from another thread, which then has it in its list. Never both, so
        # no descriptor is closed twice (a second close could hit a reused
        # number) and no process handle is used after it was closed.
        with self._state_lock:
            mine = self._workers[w.worker_index] is w
            if mine:
                self._workers[w.worker_index] = None
        if not mine:
            return  # closed meanwhile: the caller gets DatasetClosedError
        if timed_out:
            w.process.kill()
        # A worker whose socket broke is usually exiting: give it a moment,
        # for its exit code. One still running after that has only stopped
        # answering, and its stream cannot be trusted: _release ends it.
        w.process.join(_LOSE_GRACE)
        exitcode = w.process.exitcode
        release(w)
        if not w.ready and not timed_out:
            self._lost_while_starting(w, exitcode)
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

    def _lost_while_starting(self, w: _Worker, exitcode: int | None) -> None:
        method = self.start_method
        if exitcode == MAIN_REIMPORT_EXIT:
            message = main_reimport_message(w.worker_index, w.pid, method)
            self._restarts.break_(WorkerStartError(message))
            return
        self._restarts.failed(
            w.worker_index,
            RuntimeError(
                f"{w} {describe_exit(exitcode)} before it was ready; see its "
                f"output above{reimport_hint(method)}"
            ),
        )

    def _deadline(self, w: _Worker) -> float:
        """When `w`'s batch times out; start-up gets `_START_GRACE` on top."""
        assert self._timeout is not None
        return w.started + self._timeout + (0.0 if w.ready else _START_GRACE)

    def raise_if_broken(self) -> None:
        """Raises what broke the pool: its own error once, then a
        `WorkerStartError` caused by it."""
        self._restarts.raise_if_broken()

    def _check_open(self) -> None:
        if self._closed:
            raise DatasetClosedError("The dataset's worker pool was closed.")

    # -- observability and shutdown -----------------------------------------

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per live worker: index, pid, batches loaded and seconds loading."""
        return [
            {
                "index": w.worker_index,
                "pid": w.pid,
                "batches": w.batches,
                "busy_seconds": w.busy_seconds,
                "cpu_seconds": w.cpu_seconds,
            }
            for w in self._workers
            if w is not None
        ]

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w is not None]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Ends every worker and releases every socket; idempotent.

        Returns within about a second, even while loaders are busy.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            workers = [w for w in self._workers if w is not None]
            self._workers = [None] * len(self._workers)
        if not self._owner.here():
            # A copy in a forked child (the user's os.fork()): the workers
            # belong to the parent; only let go of the inherited descriptors.
            for w in workers:
                close_conn(w.conn)
                w.process.forget()
            return
        stop(workers)


def _receive(w: _Worker, msg: Loaded) -> Outcome:
    """The batch of `msg`, or the error that receiving it raised."""
    outcome = Outcome()
    try:
        outcome.value = w.reader.receive(w.conn, msg.kind, msg.payload)
    except (EOFError, ConnectionError):
        # The stream ended mid-reply (the worker died while sending): not
        # the batch's fault. The caller loses the worker, and the batch ends
        # with `WorkerDiedError`.
        raise
    except BaseException as e:
        # The batch does not unpickle here (its `__setstate__` or rebuild
        # raised, of any class: SIGINT is deferred, so even a
        # KeyboardInterrupt is the batch's own), or its shared memory could
        # not be received (transport.py says why; the stream stays in step).
        # It fails that batch only; the worker is fine.
        how = "received" if isinstance(e, OSError) else "unpickled"
        add_note(e, f"keras_oom: the batch from {w} could not be {how} in the parent")
        outcome.error = e
    return outcome
