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
  A forked child has none of the parent's other threads, and a thread pool
  that does not prepare for fork (GNU OpenMP, under torch and scikit-learn)
  deadlocks it. `forksafe.fork_hazards()` reads which threads run (from
  /proc) before every start; with any hazard the default switches to:
- `"subprocess"`: a fresh interpreter (`python -c`), with the parent's
  `sys.path` and the loader pickled by value with `cloudpickle`. Unlike
  `multiprocessing`'s `"spawn"` and `"forkserver"`, it does not re-import
  the user's main module, so an unguarded training script is not re-run.
- `"spawn"` and `"forkserver"`: `multiprocessing`'s own, on request. An
  explicit `"fork"` forks even beside a hazard, with one warning per pool.
- Every start runs under `_LAUNCH_LOCK`, and a forked worker first closes
  every descriptor the pool holds (`_OWNED_FDS`): the parent ends of all
  worker sockets, its own included, and pidfds.
- Each worker leads a session and process group of its own (worker.py),
  which the processes its loader starts inherit; a terminal's Ctrl-C
  reaches none of them. Workers are not daemonic, so a loader may start
  processes, and they are in no list of `multiprocessing`'s: the pool
  alone ends them (`_Process`).

How a pool ends, and what handles each case. Every process the pool
starts is ended and reaped by the pool, whichever way it leaves, with its
process group (the processes its loader started):

- `close()`: each worker gets a goodbye (`None`) and its socket is closed
  (idle workers exit, running their clean-up), then the remaining groups
  get SIGTERM, then `_release` kills what is left of each group (SIGKILL)
  and reaps the worker. It may come from another thread while the owner
  waits: the owner wakes with `DatasetClosedError`. Each worker is
  released exactly once, and a worker started while close() runs is
  ended by its starter.
- The owner is garbage collected, or the interpreter exits: the dataset's
  `weakref.finalize` calls `close()`. (`multiprocessing`'s exit handler,
  which joins non-daemonic children, does not know the workers.)
- A worker dies (a crash, the OOM killer, a kill by hand): its pidfd wakes
  `wait`, `_lose` kills what is left of its group, and the slot restarts.
- A worker's stream breaks while it runs (a reply that does not decode),
  or its batch outlives `timeout`: `_lose` ends it, with its group.
- A start fails after its process exists: the starter ends the process.
- The parent dies, even by SIGKILL: each worker sees end-of-file without a
  goodbye, or its thread watching the parent's pidfd wakes, and kills its
  own group at once (worker.py).
- Ctrl-C: workers ignore SIGINT. In the parent, state changes run with
  SIGINT deferred (`deferred_interrupts`), so a KeyboardInterrupt lands only
  between consistent states, never between a message and its descriptor.
- The user's process forks (`os.fork()`): the child inherits the pool's
  descriptors but must not use them; `close()` in the child only lets go
  of them, and an at-fork hook gives the child fresh locks.
- What is not covered: a process the loader started that leaves the
  worker's group on purpose (`setsid`, `start_new_session=True`) is its
  own; and where the kernel has no pidfds (Linux before 5.3), the death of
  a worker whose loader's children live on is seen only once they end.
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
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

from keras_oom import worker as worker_module
from keras_oom.errors import (
    DatasetClosedError,
    WorkerDiedError,
    WorkerStartError,
    WorkerTimeoutError,
)
from keras_oom.forksafe import fork_hazards
from keras_oom.protocol import (
    Failed,
    Load,
    Loaded,
    Ready,
    StartFailed,
    add_note,
    decode_error,
    deferred_interrupts,
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
# A worker given up on (its stream broke) is usually exiting: how long to
# wait for its exit code before ending it. And how long a SIGKILLed process
# may take to die before it is left to be reaped later.
_LOSE_GRACE = 1.0
_KILL_GRACE = 1.0

# The descriptors the pool holds in this process: the parent ends of worker
# sockets, and pidfds. A forked worker inherits every descriptor of its
# parent and must close these first: holding a parent end (its own among
# them) hides end-of-file from the worker on the other end, which then
# never learns that the pool let it go. `_LAUNCH_LOCK` makes "open and
# register", "unregister and close" and "list and fork" atomic with respect
# to each other, so a fork never misses a descriptor, nor passes a stale
# number that names something else by then.
_LAUNCH_LOCK = threading.RLock()
_OWNED_FDS: set[int] = set()


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
    """The start method that `start_method=None` picks now.

    Decided again for every worker start, from what runs in this process
    at that moment (see `keras_oom.forksafe`).

    Returns:
        `"fork"` where a forked child cannot deadlock: no thread runs but
        the caller's and those of fork-safe pools (NumPy's OpenBLAS), and
        neither JAX's runtime, TensorFlow nor CUDA has started. Otherwise
        `"subprocess"`, which is always safe.

    Example:

    ```python
    >>> from keras_oom.pool import default_start_method
    >>> default_start_method() in ("fork", "subprocess")
    True

    ```
    """
    if _fork_is_safe():
        return "fork"
    return "subprocess"


def _fork_is_safe() -> bool:
    if "fork" not in multiprocessing.get_all_start_methods():
        return False
    return not fork_hazards()


def _fork_warning(hazards: list[str]) -> str:
    return (
        f"start_method='fork': forking this process now can deadlock its "
        f"workers: {'; '.join(hazards)}. A forked child has none of these "
        f"threads, and whatever they hold (a lock, a thread pool's state) "
        f"stays held there: a worker whose loader enters such a pool (a "
        f"torch op, scikit-learn's compiled code, an OpenMP loop) waits "
        f"forever. Use start_method=None, which picks 'subprocess' here, "
        f"or 'subprocess'."
    )


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


class _Process:
    """A worker process as the pool handles it, whatever started it.

    - `sentinel` becomes readable once the process has exited. It is a
      pidfd where the kernel has them: the start method's own sentinel is
      a pipe whose write end the worker holds, and so does every process
      its loader forks, which would hide the worker's death while those
      live.
    - `exitcode` does not reap. The pid stays the worker's until `close()`,
      so signalling its process group (the worker leads one, pgid == pid:
      worker.py) cannot reach a stranger that got the pid again.
    - `terminate()` and `kill()` signal the group: the worker and every
      process its loader started (they inherit the group, unless they
      leave it on purpose).
    - `close()` kills what is left of the group, reaps and releases: after
      it, nothing of the worker runs.

    A `"forkserver"` worker is the fork server's child, which reaps it:
    its group is signalled only while it runs.
    """

    def __init__(
        self,
        pid: int,
        *,
        process: Any = None,
        popen: subprocess.Popen | None = None,
        sentinel: int | None = None,
        pipe: int | None = None,
        own_child: bool = True,
    ) -> None:
        self.pid = pid
        self._process = process  # a multiprocessing.Process, or
        self._popen = popen  # a subprocess.Popen
        self._pipe = pipe  # our own end-of-file sentinel, if no pidfd
        self._own_child = own_child
        self._pidfd = _open_pidfd(pid)
        fallback = sentinel if sentinel is not None else pipe
        chosen = self._pidfd if self._pidfd is not None else fallback
        assert chosen is not None, "a process without any sentinel"
        self.sentinel: int = chosen
        self._exitcode: int | None = None
        self._reaped = False
        self._closed = False

    @property
    def exitcode(self) -> int | None:
        """The exit code (negative: killed by that signal), None while running."""
        if self._exitcode is None:
            self._exitcode = self._peek()
        return self._exitcode

    def _peek(self) -> int | None:
        if self._own_child and not self._reaped:
            try:
                info = os.waitid(
                    os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT
                )
            except ChildProcessError:
                # Reaped behind our back (SIGCHLD ignored, an os.wait()
                # elsewhere): its group is no longer known to be its own.
                self._own_child = False
            else:
                if info is None:
                    return None
                if info.si_code == os.CLD_EXITED:
                    return info.si_status
                return -info.si_status
        if self._process is not None:
            code = self._process.exitcode
        else:
            assert self._popen is not None
            code = self._popen.poll()
        if code is None and self._pidfd is not None and wait([self._pidfd], 0):
            return 255  # gone, its status taken by someone else
        return code

    def _signal(self, signum: int) -> None:
        if self._reaped:
            return
        if self._own_child or self.exitcode is None:
            try:
                os.killpg(self.pid, signum)
                return
            except ProcessLookupError:
                pass  # not a group leader (yet): the process alone
            except PermissionError:
                pass
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signum)
            elif self._own_child:
                os.kill(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        """Waits until the process has exited, at most `timeout` seconds."""
        if self.exitcode is None:
            wait([self.sentinel], timeout)

    def close(self) -> None:
        """Kills what is left of the process and its group, reaps, releases.

        Returns within about `_KILL_GRACE` seconds; a process that is not
        dead by then (stuck in the kernel) is reaped by a later release.
        """
        if self._closed:
            return
        self._closed = True
        self.kill()
        self.join(_KILL_GRACE)
        if self.exitcode is None:
            _UNREAPED.append(self)
            return
        self._reap()

    def _reap(self) -> None:
        if self._process is not None:
            if self._own_child:
                self._process.exitcode  # noqa: B018  (waitpid: it has exited)
            else:  # the fork server reports the status on its own pipe
                self._process.join(_KILL_GRACE)
            with contextlib.suppress(ValueError):  # status never reported
                self._process.close()
        elif self._popen is not None:
            self._popen.poll()
        self._reaped = True
        self.forget()

    def forget(self) -> None:
        """Releases this handle's descriptors, leaving the process alone.

        For a copy of the pool in a child of the user's `os.fork()`: the
        process is the parent's to end.
        """
        for fd in (self._pidfd, self._pipe):
            if fd is not None:
                _close_fd(fd)
        self._pidfd = self._pipe = None


# Processes killed but not yet dead when released: reaped by a later release.
_UNREAPED: list[_Process] = []


def _reap_leftovers() -> None:
    for p in list(_UNREAPED):
        if p.exitcode is None:
            continue
        with _RELEASE_LOCK:  # one thread reaps each
            if p not in _UNREAPED:
                continue
            _UNREAPED.remove(p)
        p._reap()


def _pidfds_work() -> bool:
    """Whether this kernel gives pidfds (Linux 5.3 and later)."""
    global _PIDFDS
    if _PIDFDS is None:
        try:
            os.close(os.pidfd_open(os.getpid()))
            _PIDFDS = True
        except (AttributeError, OSError):
            _PIDFDS = False
    return _PIDFDS


_PIDFDS: bool | None = None


def _open_pidfd(pid: int) -> int | None:
    """A registered pidfd of `pid`, or None where the kernel has none."""
    if not _pidfds_work():
        return None
    with _LAUNCH_LOCK:
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone already: the start method's sentinel tells
            return None
        _OWNED_FDS.add(fd)
    return fd


def _new_connection() -> tuple[Connection, socket.socket]:
    """A socket pair: the parent's end (registered) and the child's."""
    with _LAUNCH_LOCK:
        parent_sock, child_sock = socket.socketpair()
        conn = Connection(parent_sock.detach())
        _OWNED_FDS.add(conn.fileno())
    return conn, child_sock


def _close_conn(conn: Connection) -> None:
    with _LAUNCH_LOCK:
        if conn.closed:
            return
        _OWNED_FDS.discard(conn.fileno())
        conn.close()


def _close_fd(fd: int) -> None:
    with _LAUNCH_LOCK:
        _OWNED_FDS.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


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
        self._warned_fork = False  # an explicit "fork" that is unsafe: once

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

    def _method_for_start(self) -> str:
        """The start method of the next worker; warns once per pool when an
        explicit `"fork"` is unsafe now."""
        if self._start_method is None:
            return default_start_method()
        if self._start_method == "fork" and not self._warned_fork:
            hazards = fork_hazards()
            if hazards:
                self._warned_fork = True
                warnings.warn(_fork_warning(hazards), RuntimeWarning, stacklevel=2)
        return self._start_method

    def _start_worker(self, slot: int) -> _Worker:
        """Starts a worker process for `slot`; raises if it cannot.

        Every start runs under `_LAUNCH_LOCK`, from the socket pair to the
        moment the parent has closed the child's descriptors: a fork in
        another thread meanwhile would inherit them, and a forked worker
        must get the complete list of the pool's descriptors to close.
        """
        method = self._method_for_start()
        setup: Any = self._setup if method == "fork" else self._setup_pickled(method)
        with _LAUNCH_LOCK:
            conn, child_sock = _new_connection()
            try:
                if method == "subprocess":
                    process = self._start_subprocess(slot, child_sock)
                else:
                    process = self._start_multiprocessing(
                        method, slot, child_sock, setup
                    )
            except BaseException:
                _close_conn(conn)
                child_sock.close()
                raise
        try:
            if method == "subprocess":
                with contextlib.suppress(OSError):  # if it died, its sentinel tells
                    conn.send_bytes(setup)
            return _Worker(slot, process, conn)
        except BaseException:
            # The process exists: a start that fails now must end it.
            _close_conn(conn)
            process.close()
            raise

    def _start_multiprocessing(
        self, method: str, slot: int, child_sock: socket.socket, setup: Any
    ) -> _Process:
        ctx: Any = multiprocessing.get_context(method)
        child_conn = Connection(child_sock.detach())
        # A forked worker closes these first thing: the parent ends of every
        # worker socket (its own included) and the pool's pidfds.
        inherited = sorted(_OWNED_FDS) if method == "fork" else []
        process = ctx.Process(
            target=worker_module.run,
            args=(child_conn, setup, os.getpid(), slot, inherited),
            name=f"keras_oom-worker-{slot}",
            # Not daemonic: a loader may start processes of its own
            # (multiprocessing refuses children to daemonic processes).
            # Workers die with the parent through their own watch instead.
            daemon=False,
        )
        try:
            process.start()
        finally:
            child_conn.close()
        # Ours alone to end: out of multiprocessing's list, whose exit
        # handler would join this non-daemonic process forever, and whose
        # clean-up at every start would reap it under `_Process`.
        multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]
        try:
            return _Process(
                process.pid,
                process=process,
                sentinel=process.sentinel,
                own_child=method != "forkserver",
            )
        except BaseException:
            process.kill()
            process.join(_KILL_GRACE)
            raise

    def _start_subprocess(self, slot: int, child_sock: socket.socket) -> _Process:
        child_fd = child_sock.detach()
        code = (
            f"import sys; sys.path[:] = {sys.path!r}; "
            f"from keras_oom.worker import subprocess_main; "
            f"subprocess_main({child_fd}, {os.getpid()}, {slot})"
        )
        pipe_r = pipe_w = None
        if not _pidfds_work():  # then a pipe tells when the child has exited
            pipe_r, pipe_w = os.pipe()
            _OWNED_FDS.add(pipe_r)
        try:
            popen = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=(child_fd,) if pipe_w is None else (child_fd, pipe_w),
                stdin=subprocess.DEVNULL,
                # A session (and process group) of its own: Ctrl-C during its
                # start-up, before it can ignore SIGINT, must not kill it, and
                # the pool ends it with every process its loader starts.
                start_new_session=True,
            )
        except BaseException:
            if pipe_r is not None:
                _close_fd(pipe_r)
            raise
        finally:
            os.close(child_fd)
            if pipe_w is not None:
                os.close(pipe_w)
        return _Process(popen.pid, popen=popen, pipe=pipe_r)

    # -- requests -----------------------------------------------------------

    def submit(self, slot: int, load: Load) -> None:
        """Sends `load` to the worker in `slot`; the result comes from `wait`.

        `load.ids` is already pickled (`protocol.pack_ids`), so nothing here
        runs the user's code: once the checks pass, the worker is marked busy
        and the request goes out, or the worker's death reports it (`Lost`).

        Raises:
            DatasetClosedError: If the pool was closed.
            WorkerStartError: (or the error that broke it) If broken.
                Either way nothing was sent, the slot is unchanged, and every
                later call raises too.
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
        """Reads every message `w` has sent; False if `w` is gone.

        Runs with SIGINT deferred (`wait`), so any exception here comes from
        the stream or from the messages, never from Ctrl-C.
        """
        try:
            while w.conn.poll():
                self._handle(w, w.conn.recv(), events)
            return w.process.exitcode is None or w.conn.poll()
        except BaseException:
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
            except (EOFError, ConnectionError):
                # The stream ended mid-reply (the worker died while sending):
                # not the batch's fault. `_drain` loses the worker, and the
                # batch ends with `WorkerDiedError`.
                raise
            except BaseException as e:
                # The batch does not unpickle here (its `__setstate__` or
                # rebuild raised, of any class: SIGINT is deferred, so even
                # a KeyboardInterrupt is the batch's own), or its shared
                # memory could not be received (transport.py says why; the
                # stream stays in step). It fails that batch only; the
                # worker is fine.
                how = "received" if isinstance(e, OSError) else "unpickled"
                add_note(
                    e,
                    f"keras_oom: the batch from {self._where(w)} could not "
                    f"be {how} in the parent",
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
        # A worker whose socket broke is usually exiting: give it a moment,
        # for its exit code. One still running after that has only stopped
        # answering, and its stream cannot be trusted: _release ends it.
        w.process.join(_LOSE_GRACE)
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
        if os.getpid() != self._owner_pid:
            # A copy in a forked child (the user's os.fork()): the workers
            # belong to the parent; only let go of the inherited descriptors.
            for w in workers:
                _close_conn(w.conn)
                w.process.forget()
            return
        _stop(workers)


class _Unpicklable(Exception):
    """A start failed because the setup does not pickle: it never will."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _stop(workers: list[_Worker]) -> None:
    """Ends `workers`: end-of-file, then SIGTERM, then SIGKILL.

    Each signal goes to a worker's whole process group, and `_release`
    ends what is left of the group even after a clean exit: processes the
    loader started do not outlive their worker.
    """
    for w in workers:
        # Goodbye first: an idle worker exits as asked, its loader's clean-up
        # included; end-of-file alone would tell it that the parent died.
        with contextlib.suppress(OSError, ValueError):
            w.conn.send(None)
        _close_conn(w.conn)
    _join_all(workers, _EXIT_GRACE)
    for w in workers:
        if w.process.exitcode is None:
            w.process.terminate()
    _join_all(workers, _TERM_GRACE)
    for w in workers:
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
    """Ends `w` for good, once, whoever calls first: closes its socket,
    kills what is left of its process group, reaps it."""
    with _RELEASE_LOCK:
        if w.released:
            return
        w.released = True
    _close_conn(w.conn)
    w.process.close()
    _reap_leftovers()


def _after_fork_in_child() -> None:
    """In any child of a fork of this process: fresh locks, no leftovers.

    Another thread may have held a lock at the fork; in the child nobody
    would release it. The processes waiting to be reaped are the parent's.
    (The workers are in no list of multiprocessing's, so the child's exit
    handler cannot end the parent's workers.)
    """
    global _LAUNCH_LOCK, _RELEASE_LOCK
    _LAUNCH_LOCK = threading.RLock()
    _RELEASE_LOCK = threading.Lock()
    _UNREAPED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
