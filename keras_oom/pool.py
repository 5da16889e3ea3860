"""A fixed pool of worker processes, each loading one batch at a time.

Data flow (parent on the left, one worker on the right):

    PrefetchLoaderDataset (prefetch.py)        worker process (worker.py)
      | Schedule (schedule.py) decides          |
      | which slot loads which key              |
      v                                          |
    WorkerPool.submit(slot, Load) -- socket --> loader(ids[, rng])
      | slots: one worker each, or vacant        |
      | wait(): multiprocessing.connection.wait  |
      |   over every socket and process          |
      |   sentinel, the nearest timeout and      |
      |   the next restart of a vacant slot      |
      v                                          |
    take_events():                               |
      Arrived(slot, key, Outcome) <--------- Loaded | Failed (protocol.py)
      Lost(slot, key, Outcome | None)        array data via memfd
      Joined(slot)                           (transport.py)

- The parent sends a worker a request only when the schedule says it is
  idle, so each worker has at most one batch in flight.
- One rule for every failure: it ends the batch it affects with an error
  for that batch, and the pool restarts the slot. A loader exception and a
  batch that does not unpickle come back as `Arrived` with an error; a
  worker that dies or outlives `timeout` as `Lost` with a
  `WorkerDiedError` or `WorkerTimeoutError`.
- A slot whose worker cannot be started (the start raises, or workers die
  before they are ready) is retried with a growing pause;
  `MAX_START_FAILURES` failures of one slot in a row break the pool, and
  every later call raises at once (`WorkerStartError`). A start that fails
  for a reason that cannot change (the loader does not pickle,
  `worker_init` raised) breaks it at once. So nothing spins and nothing waits forever.
- Workers are started once, at the dataset's first use, and serve every
  epoch.

How workers start (`start_method`):

- `"fork"` (the default while it is safe): fast, and nothing is pickled.
  Forking a process in which JAX, TensorFlow or CUDA runs threads can
  deadlock the child, so once one of them has started, the default (chosen
  again for each start) switches to:
- `"subprocess"`: a fresh interpreter (`python -c`), in a session of its
  own so that a terminal's Ctrl-C never reaches it, with the parent's
  `sys.path` and the loader pickled by value with `cloudpickle`. Unlike
  `multiprocessing`'s `"spawn"` and `"forkserver"`, it does not re-import
  the user's main module, so an unguarded training script is not re-run.
- `"spawn"` and `"forkserver"`: `multiprocessing`'s own, on request.

How a pool ends, and what handles each case:

- `close()`: every socket is closed (idle workers exit on end-of-file),
  then the remaining workers get SIGTERM, then SIGKILL after a short grace.
  It may come from another thread while the owner waits: the owner wakes
  with `DatasetClosedError`. Each worker is released exactly once.
- The owner is garbage collected, or the interpreter exits: the dataset's
  `weakref.finalize` calls `close()`.
- A worker dies: its sentinel wakes `wait`, and the slot restarts.
- The parent dies, even by SIGKILL: each worker watches the parent's pidfd
  in a thread and exits at once (worker.py).
- Ctrl-C: workers ignore SIGINT. In the parent, state changes run with
  SIGINT deferred (`deferred_interrupts`), so a KeyboardInterrupt lands only
  between consistent states, never between a message and its descriptor.
- The user's process forks (`os.fork()`): the child inherits the pool's
  sockets but must not use them, and `multiprocessing`'s exit handler in
  the child would terminate our workers; an at-fork hook takes them out of
  its list, and `close()` in the child only lets go of the sockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

from keras_oom import worker as worker_module
from keras_oom.errors import (
    DatasetClosedError,
    WorkerDiedError,
    WorkerStartError,
    WorkerTimeoutError,
)
from keras_oom.protocol import (
    Failed,
    Load,
    Loaded,
    Ready,
    StartFailed,
    add_note,
    decode_error,
)
from keras_oom.transport import BatchReader

START_METHODS = ("fork", "forkserver", "spawn", "subprocess")

# close(): how long idle workers get to exit on their own, then how long
# SIGTERM gets before SIGKILL.
_EXIT_GRACE = 0.1
_TERM_GRACE = 0.5
# A worker's start-up (a fresh interpreter importing what the loader needs)
# does not count against `timeout`; this bounds it instead.
_START_GRACE = 60.0
# Failed starts of a slot in a row before the pool gives up, and the pause
# before the first retry (doubled each time).
MAX_START_FAILURES = 3
_RETRY_PAUSE = 0.05
# select() and its kin overflow past ~24.8 days; waits are cut into pieces.
_MAX_WAIT = 3600.0

# Every open pool of this process: a forked worker closes their sockets, which
# it inherits but must not hold (a held socket hides end-of-file from the
# worker on the other end).
_LIVE_POOLS: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@dataclasses.dataclass
class Outcome:
    """How one batch ended: its value, or the error that replaced it."""

    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0
    pid: int = 0


class Arrived(NamedTuple):
    slot: int
    key: Any
    outcome: Outcome


class Lost(NamedTuple):
    slot: int
    key: Any  # the key the worker held, or None
    outcome: Outcome | None  # the error for that key; None: send it again


class Joined(NamedTuple):
    slot: int


Event = Arrived | Lost | Joined


class WorkerSetup(NamedTuple):
    """What every worker needs before its first batch."""

    loader: Callable[..., Any]
    worker_init: Callable[[int], Any] | None


def pickle_setup(setup: WorkerSetup, method: str) -> bytes:
    """`setup` pickled by value for a worker that is not forked.

    Raises:
        TypeError: If it does not pickle, saying what to do instead.
    """
    try:
        return _dumps_naming_files(setup)
    except Exception as e:
        raise TypeError(
            f"The loader {setup.loader!r} (or worker_init) cannot be pickled "
            f"with cloudpickle, which start_method={method!r} needs "
            f"({type(e).__name__}: {_safe_str(e)}). Make it picklable: open "
            f"files, connections and locks in each worker instead, in "
            f"`worker_init` or lazily on the loader's first call (see "
            f"docs/pool.md, 'Per-worker setup')."
        ) from e


def _dumps_naming_files(obj: Any) -> bytes:
    """`cloudpickle.dumps`, keeping the file name of code pickled by value.

    cloudpickle names the file of every function it pickles by value (one
    defined in the user's script) `<dynamic-code>`, so the worker's
    traceback could not say where the loader failed. Workers run on this
    machine, where the file is: with its real name, their tracebacks show
    the file and the failing line, as they do for a forked worker.
    """
    import io
    import types
    from collections import ChainMap

    import cloudpickle

    base = cloudpickle.Pickler.dispatch_table.get(types.CodeType)
    if base is None:  # a cloudpickle that reduces code otherwise
        return cloudpickle.dumps(obj)

    def reduce_code(code: types.CodeType) -> Any:
        rebuild, args = base(code)
        args = tuple(
            code.co_filename if isinstance(a, str) and a == "<dynamic-code>" else a
            for a in args
        )
        return rebuild, args

    class Pickler(cloudpickle.Pickler):
        dispatch_table = ChainMap(
            {types.CodeType: reduce_code}, cloudpickle.Pickler.dispatch_table
        )

    with io.BytesIO() as f:
        Pickler(f).dump(obj)
        return f.getvalue()


def default_start_method() -> str:
    """Returns `"fork"` where forking is safe now, else `"subprocess"`."""
    if _fork_is_safe():
        return "fork"
    return "subprocess"


def _fork_is_safe() -> bool:
    if "fork" not in multiprocessing.get_all_start_methods():
        return False
    # Threads the child would inherit mid-operation, holding locks that
    # nobody will release there.
    if threading.active_count() > 1:
        return False
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    if xla_bridge is not None and getattr(xla_bridge, "_backends", None):
        return False
    if "tensorflow" in sys.modules:
        return False
    torch_cuda = sys.modules.get("torch.cuda")
    return torch_cuda is None or not torch_cuda.is_initialized()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Holds SIGINT back until the block ends, then delivers it.

    Python raises KeyboardInterrupt between any two bytecodes; inside a
    block that updates the pool and the schedule together, that would leave
    them disagreeing (a key marked sent but never sent, a descriptor left
    in a socket). Only the main thread receives signals, so elsewhere this
    does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None or previous is signal.SIG_IGN:
        yield
        return
    received: list[Any] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[0])
            else:  # SIG_DFL
                os.kill(os.getpid(), signal.SIGINT)


class _Worker:
    def __init__(self, slot: int, process: Any, conn: Connection) -> None:
        self.slot = slot
        self.process = process
        self.conn = conn
        self.pid: int = process.pid
        self.key: Any = None  # the batch in flight, if any
        self.ready = False  # has run its setup and is serving
        self.started = time.perf_counter()  # of start-up, then of the batch
        self.batches = 0
        self.busy_seconds = 0.0
        self.cpu_seconds = 0.0  # as the worker last reported it
        self.reader = BatchReader()
        self.released = False


class _SubprocessHandle:
    """The parts of `multiprocessing.Process` the pool uses, for a Popen."""

    def __init__(self, popen: subprocess.Popen, sentinel: int) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.sentinel = sentinel

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def terminate(self) -> None:
        self._popen.terminate()

    def kill(self) -> None:
        self._popen.kill()

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)

    def close(self) -> None:
        os.close(self.sentinel)


class WorkerPool:
    """`size` worker slots that run the loader on request.

    Not thread-safe except for `close()`: the owning dataset serialises the
    other calls with its lock.

    Args:
        setup: The loader and `worker_init`, shipped to every worker.
        size: Number of worker slots.
        start_method: One of `START_METHODS`, or `None` to pick per start
            with `default_start_method()`.
        timeout: Seconds one batch may take before its worker is replaced,
            or `None` for no limit.
    """

    def __init__(
        self,
        setup: WorkerSetup,
        size: int,
        *,
        start_method: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self._setup = setup
        self._setup_bytes: bytes | None = None
        self._start_method = start_method
        self._timeout = timeout
        self._closed = False
        self._broken: BaseException | None = None
        self._broken_raised = False
        self._slots: list[_Worker | None] = [None] * size
        self._retry_at = [0.0] * size
        # Failed starts in a row, per slot: one Ctrl-C that kills every
        # starting worker is one failure of each slot, not a broken pool.
        self._failures = [0] * size
        self.retired_cpu_seconds = 0.0  # of workers that are gone, for stats
        self._events: list[Event] = []  # until take_events()
        # Guards the slots against close() from another thread (or a
        # finalizer) while the owner replaces a worker.
        self._state_lock = threading.Lock()
        self.started_at = time.perf_counter()
        self._owner_pid = os.getpid()
        _LIVE_POOLS.add(self)

    def start(self) -> None:
        """Starts a worker in every slot (`Joined` for each, in `take_events`)."""
        _exit_if_reimporting_main()
        try:
            for slot in range(len(self._slots)):
                self._fill(slot, self._events)
            self.raise_if_broken()
        except BaseException:
            self.close()  # no worker may outlive a start that raised
            raise

    def take_events(self) -> list[Event]:
        """The events since the last call, oldest first.

        Events stay in the pool until taken, so a KeyboardInterrupt that
        lands after `wait()` has read a message, but before its caller has
        applied the event, cannot lose it: the next call returns it.
        """
        events, self._events = self._events, []
        return events

    # -- starting workers ---------------------------------------------------

    def _fill(self, slot: int, events: list[Event]) -> None:
        """Starts a worker in vacant `slot`, recording a failure if it fails."""
        if self._closed or self._broken is not None:
            return
        try:
            new = self._start_worker(slot)
        except _Unpicklable as e:
            self._break(e.error)
            return
        except Exception as e:
            self._start_failed(slot, e)
            return
        with self._state_lock:
            if self._closed:  # closed from another thread meanwhile
                accepted = False
            else:
                self._slots[slot] = new
                accepted = True
        if not accepted:
            _stop([new])
            return
        events.append(Joined(slot))

    def _start_failed(self, slot: int, error: BaseException) -> None:
        self._failures[slot] += 1
        failures = self._failures[slot]
        if failures >= MAX_START_FAILURES:
            broken = WorkerStartError(
                f"keras_oom worker {slot} failed to start {failures} times in a "
                f"row; the last time: {_describe(error)}"
            )
            broken.__cause__ = error
            self._break(broken)
        else:
            pause = _RETRY_PAUSE * 2 ** (failures - 1)
            self._retry_at[slot] = time.monotonic() + pause

    def _break(self, error: BaseException) -> None:
        if self._broken is None:
            self._broken = error

    def _setup_pickled(self, method: str) -> bytes:
        if self._setup_bytes is None:
            try:
                self._setup_bytes = pickle_setup(self._setup, method)
            except TypeError as e:
                raise _Unpicklable(e) from e
        return self._setup_bytes

    def _start_worker(self, slot: int) -> _Worker:
        method = self._start_method or default_start_method()
        parent_sock, child_sock = socket.socketpair()
        conn = Connection(parent_sock.detach())
        try:
            if method == "subprocess":
                process: Any = self._start_subprocess(slot, child_sock, conn)
            else:
                process = self._start_multiprocessing(method, slot, child_sock)
        except BaseException:
            conn.close()
            child_sock.close()
            raise
        return _Worker(slot, process, conn)

    def _start_multiprocessing(
        self, method: str, slot: int, child_sock: socket.socket
    ) -> Any:
        ctx: Any = multiprocessing.get_context(method)
        child_conn = Connection(child_sock.detach())
        if method == "fork":
            setup: Any = self._setup
            inherited = [
                w.conn.fileno()
                for pool in list(_LIVE_POOLS)
                for w in pool._slots
                if w is not None and not w.conn.closed
            ]
        else:
            setup, inherited = self._setup_pickled(method), []
        process = ctx.Process(
            target=worker_module.run,
            args=(child_conn, setup, os.getpid(), slot, inherited),
            name=f"keras_oom-worker-{slot}",
            daemon=True,
        )
        try:
            process.start()
        finally:
            child_conn.close()
        return process

    def _start_subprocess(
        self, slot: int, child_sock: socket.socket, conn: Connection
    ) -> _SubprocessHandle:
        setup = self._setup_pickled("subprocess")
        child_fd = child_sock.detach()
        code = (
            f"import sys; sys.path[:] = {sys.path!r}; "
            f"from keras_oom.worker import subprocess_main; "
            f"subprocess_main({child_fd}, {os.getpid()}, {slot})"
        )
        sentinel_r, sentinel_w = os.pipe()  # EOF once the child has exited
        try:
            popen = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=(child_fd, sentinel_w),
                stdin=subprocess.DEVNULL,
                # Out of the terminal's process group: Ctrl-C during its
                # start-up, before it can ignore SIGINT, must not kill it.
                start_new_session=True,
            )
        except BaseException:
            os.close(sentinel_r)
            raise
        finally:
            os.close(child_fd)
            os.close(sentinel_w)
        handle = _SubprocessHandle(popen, sentinel_r)
        with contextlib.suppress(OSError):  # if it died, its sentinel tells
            conn.send_bytes(setup)
        return handle

    # -- requests -----------------------------------------------------------

    def submit(self, slot: int, load: Load) -> None:
        """Sends `load` to the worker in `slot`; the result comes from `wait`.

        Raises:
            DatasetClosedError: If the pool was closed.
            WorkerStartError: (or the error that broke it) If broken.
        """
        self._check_open()
        self.raise_if_broken()
        w = self._slots[slot]
        assert w is not None and w.key is None, f"slot {slot} is not idle"
        w.key = load.key
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
        events = self._events
        with deferred_interrupts():
            self._refill(events)
        if events or not self.expecting():
            return
        live = [w for w in self._slots if w is not None]
        vacant = [s for s, w in enumerate(self._slots) if w is None]
        deadlines = [self._retry_at[s] - time.monotonic() for s in vacant]
        if self._timeout is not None:
            now = time.perf_counter()
            deadlines += [self._deadline(w) - now for w in live if w.key is not None]
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
                if w not in dead and not self._drain(w, events):
                    dead.append(w)
            for w in dead:
                self._lose(w, events)
            if self._timeout is not None:
                now = time.perf_counter()
                for w in [w for w in self._slots if w is not None]:
                    if w.key is not None and now >= self._deadline(w):
                        self._lose(w, events, timed_out=True)
            self._refill(events)

    def expecting(self) -> bool:
        """Whether `wait()` has something to wait for: a batch in flight, or
        a vacant slot to restart."""
        return any(w is None or w.key is not None for w in self._slots)

    def _refill(self, events: list[Event]) -> None:
        now = time.monotonic()
        for slot, w in enumerate(self._slots):
            if w is None and now >= self._retry_at[slot]:
                self._fill(slot, events)

    def _drain(self, w: _Worker, events: list[Event]) -> bool:
        """Reads every message `w` has sent; False if `w` is gone."""
        try:
            while w.conn.poll():
                self._handle(w, w.conn.recv(), events)
            return w.process.exitcode is None or w.conn.poll()
        except Exception:
            # End of file, a broken socket, a descriptor that never came, a
            # message that does not unpickle: the stream cannot be trusted.
            return False

    def _handle(self, w: _Worker, msg: Any, events: list[Event]) -> None:
        if isinstance(msg, Ready):
            w.ready = True
            w.started = time.perf_counter()  # `timeout` counts loading only
            self._failures[w.slot] = 0
            return
        if isinstance(msg, StartFailed):
            where = f"worker {w.slot} (pid {w.pid}) while starting"
            error = decode_error(msg.error, where)
            add_note(error, "keras_oom: the pool cannot start workers; it is broken")
            self._break(error)
            return
        if isinstance(msg, Failed):
            outcome = Outcome(error=decode_error(msg.error, self._where(w)))
        elif isinstance(msg, Loaded):
            outcome = Outcome()
            try:
                outcome.value = w.reader.receive(w.conn, msg.kind, msg.payload)
            except Exception as e:  # the batch does not unpickle here
                add_note(
                    e,
                    f"keras_oom: the batch from {self._where(w)} could not "
                    f"be unpickled in the parent",
                )
                outcome.error = e
        else:
            raise TypeError(f"unexpected message from a worker: {msg!r}")
        outcome.seconds, outcome.pid = msg.seconds, w.pid
        w.cpu_seconds = msg.cpu
        w.key = None
        w.batches += 1
        w.busy_seconds += msg.seconds
        events.append(Arrived(w.slot, msg.key, outcome))

    def _lose(
        self, w: _Worker, events: list[Event], *, timed_out: bool = False
    ) -> None:
        """Ends `w`, fails its batch, and starts a worker in its slot."""
        # Whoever takes `w` out of its slot ends it: this call, or close()
        # from another thread, which then has it in its list. Never both, so
        # no descriptor is closed twice (a second close could hit a reused
        # number) and no process handle is used after it was closed.
        with self._state_lock:
            mine = self._slots[w.slot] is w
            if mine:
                self._slots[w.slot] = None
        if not mine:
            return  # closed meanwhile: the caller gets DatasetClosedError
        if timed_out:
            w.process.kill()
        w.process.join(1.0)
        exitcode = w.process.exitcode
        _release(w)
        if not w.ready and not timed_out and exitcode == MAIN_REIMPORT_EXIT:
            self._break(WorkerStartError(_main_reimport_message(w, self._start_method)))
        elif not w.ready and not timed_out:
            self._start_failed(
                w.slot,
                RuntimeError(
                    f"worker {w.slot} (pid {w.pid}) {_describe_exit(exitcode)} "
                    f"before it was ready; see its output above"
                    f"{_reimport_hint(self._start_method)}"
                ),
            )
        self.retired_cpu_seconds += w.cpu_seconds
        outcome = None
        # A worker that died before it was ready never started on its batch,
        # and a broken pool raises what broke it at the next call: either
        # way the batch goes back to be sent again, and the start failure
        # (e.g. from worker_init) decides what the caller sees.
        if w.key is not None and (w.ready or timed_out) and self._broken is None:
            if timed_out:
                error: BaseException = WorkerTimeoutError(
                    f"Worker pid {w.pid} took longer than timeout={self._timeout}s "
                    f"and was killed."
                )
            else:
                error = WorkerDiedError(
                    f"Worker pid {w.pid} {_describe_exit(exitcode)}."
                    f"{_likely_causes(exitcode)}",
                    pid=w.pid,
                    exitcode=exitcode,
                    batch_index=None,
                )
            outcome = Outcome(error=error, pid=w.pid)
        events.append(Lost(w.slot, w.key, outcome))
        if self._retry_at[w.slot] <= time.monotonic():
            self._fill(w.slot, events)

    def _deadline(self, w: _Worker) -> float:
        """When `w`'s batch times out; start-up gets `_START_GRACE` on top."""
        assert self._timeout is not None
        return w.started + self._timeout + (0.0 if w.ready else _START_GRACE)

    def _where(self, w: _Worker) -> str:
        return f"worker {w.slot} (pid {w.pid})"

    def raise_if_broken(self) -> None:
        """Raises what broke the pool: its own error once, then a
        `WorkerStartError` caused by it."""
        broken = self._broken
        if broken is None:
            return
        if not self._broken_raised and not isinstance(broken, WorkerStartError):
            self._broken_raised = True
            raise broken
        error = WorkerStartError(
            f"The dataset's worker pool is broken: {_describe(broken)}"
        )
        raise error from broken

    @property
    def broken(self) -> bool:
        return self._broken is not None

    def _check_open(self) -> None:
        if self._closed:
            raise DatasetClosedError("The dataset's worker pool was closed.")

    # -- observability and shutdown -----------------------------------------

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per live worker: slot, pid, batches loaded and seconds loading."""
        return [
            {
                "index": w.slot,
                "pid": w.pid,
                "batches": w.batches,
                "busy_seconds": w.busy_seconds,
                "cpu_seconds": w.cpu_seconds,
            }
            for w in self._slots
            if w is not None
        ]

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._slots if w is not None]

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
            workers = [w for w in self._slots if w is not None]
            self._slots = [None] * len(self._slots)
        _LIVE_POOLS.discard(self)
        if os.getpid() != self._owner_pid:
            # A copy in a forked child (the user's os.fork()): the workers
            # belong to the parent; only let go of the inherited sockets.
            for w in workers:
                w.conn.close()
            return
        _stop(workers)


class _Unpicklable(Exception):
    """A start failed because the setup does not pickle: it never will."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _stop(workers: list[_Worker]) -> None:
    """Ends `workers`: end-of-file, then SIGTERM, then SIGKILL."""
    for w in workers:
        w.conn.close()  # idle workers exit on end-of-file
    _join_all(workers, _EXIT_GRACE)
    for w in workers:
        if w.process.exitcode is None:
            w.process.terminate()
    _join_all(workers, _TERM_GRACE)
    for w in workers:
        if w.process.exitcode is None:
            w.process.kill()
        w.process.join(1.0)
        _release(w)


def _join_all(workers: list[_Worker], seconds: float) -> None:
    alive = [w.process.sentinel for w in workers if w.process.exitcode is None]
    deadline = time.monotonic() + seconds
    while alive:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for s in wait(alive, left):
            alive.remove(s)


_RELEASE_LOCK = threading.Lock()


def _release(w: _Worker) -> None:
    """Closes `w`'s socket and process handle, once whoever calls first."""
    with _RELEASE_LOCK:
        if w.released:
            return
        w.released = True
    w.conn.close()
    try:
        w.process.join(0)
        w.process.close()
    except ValueError:  # still running: leave the handle to the GC
        pass


def _forget_workers_in_forked_child() -> None:
    """In a child of `os.fork()`, stops multiprocessing from ending our workers.

    The child inherits `multiprocessing.process._children`, and its exit
    handler terminates every daemonic process listed there: the parent's
    workers. They are not the child's to end.
    """
    children = multiprocessing.process._children  # type: ignore[attr-defined]
    for pool in list(_LIVE_POOLS):
        for w in pool._slots:
            if w is not None:
                children.discard(w.process)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers_in_forked_child)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {_safe_str(error)}"


def _safe_str(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:
        return f"<{type(e).__name__}>"


# The exit code of a worker that multiprocessing was starting by re-running
# the main module, and that found the main module starting workers itself.
MAIN_REIMPORT_EXIT = 87


def _exit_if_reimporting_main() -> None:
    """Ends this process if it is a worker re-running an unguarded script.

    `"spawn"` and `"forkserver"` start a worker by importing the main
    module again (as `__mp_main__`), with `_inheriting` set on the current
    process. A script that starts workers at its top level, outside
    `if __name__ == "__main__":`, gets here in every worker, where
    multiprocessing would refuse to start processes and the script would
    run on. Exit at once with a code the parent recognises instead.
    """
    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return
    # runpy runs the script as __mp_main__; __main__ is still multiprocessing's.
    module = sys.modules.get("__mp_main__") or sys.modules.get("__main__")
    main = getattr(module, "__file__", None) or "the main module"
    sys.stderr.write(
        f"keras_oom: this worker process is re-running {main} (its start "
        f"method imports the main module again), which starts workers at its "
        f"top level: put the script's work under "
        f'`if __name__ == "__main__":`. Exiting.\n'
    )
    sys.stderr.flush()
    os._exit(MAIN_REIMPORT_EXIT)


def _main_reimport_message(w: _Worker, method: str | None) -> str:
    main = getattr(sys.modules.get("__main__"), "__file__", None) or "__main__"
    return (
        f"keras_oom worker {w.slot} (pid {w.pid}) exited before it was ready: "
        f"start_method={method!r} starts each worker by importing the main "
        f"module ({main}) again, and it starts this dataset's workers at its "
        f'top level, without an `if __name__ == "__main__":` guard, so every '
        f"worker would run the script again. Put the script's work under "
        f'`if __name__ == "__main__":`, or use start_method=None (the '
        f"default), which starts workers without importing the main module."
    )


def _reimport_hint(method: str | None) -> str:
    """Why a `"spawn"` / `"forkserver"` worker may die before it is ready."""
    if method not in ("spawn", "forkserver"):
        return ""
    return (
        f". start_method={method!r} imports the main module again in each "
        f"worker: if its output shows your script running again, guard the "
        f'script\'s work with `if __name__ == "__main__":`, or use '
        f"start_method=None (the default), which does not import it"
    )


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped responding"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def _likely_causes(exitcode: int | None) -> str:
    """What usually kills a loader's process this way, as loky says."""
    if exitcode == -signal.SIGKILL:
        return (
            " Likely causes: the system ran out of memory (the OOM killer), "
            "or the process was killed by hand."
        )
    if exitcode in (-signal.SIGSEGV, -signal.SIGBUS, -signal.SIGABRT):
        return (
            " Likely cause: a crash in native code called by the loader; "
            "its stack is in the worker's output above (faulthandler)."
        )
    return ""
