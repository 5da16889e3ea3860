"""A fixed pool of worker processes, each loading one batch at a time.

Data flow (parent on the left, one worker on the right):

    PrefetchLoaderDataset                      worker process (worker.py)
      | submit(key, ids)                         |
      v                                          |
    WorkerPool ---- (key, ids) ---- socket ----> loader(ids)
      | in-flight table: worker -> key           |
      | wait(): multiprocessing.connection.wait  |
      |   over every socket and process          |
      |   sentinel, and the nearest timeout      |
      v                                          |
    Completion(key, value | error) <-- socket -- (key, seconds, batch header)
                                    <-- memfd --- array data (transport.py)
    the ids of buffers the caller has freed ride on the next request

- The parent sends a worker a request only when the worker is idle, so each
  worker has at most one batch in flight and the table is exact.
- `wait` reports three kinds of completions: a batch, a loader exception
  (re-raised by the caller with the worker's traceback as its cause), and a
  worker that died or outlived `timeout`. A dead or stuck worker is replaced
  at once, so the pool keeps its size.
- Workers are started once and serve every epoch.

How workers start (`start_method`):

- `"fork"` (the default while it is safe): fast, and the loader needs no
  pickling. Forking a process in which JAX, TensorFlow or CUDA runs threads
  can deadlock the child, so once one of them has started, the default
  switches to:
- `"subprocess"`: a fresh interpreter (`python -c`) that gets the parent's
  `sys.path` and the loader pickled by value with `cloudpickle`. Unlike
  `multiprocessing`'s `"spawn"` and `"forkserver"`, it does not re-import the
  user's main module, so an unguarded training script is not re-run inside
  every worker.
- `"spawn"` and `"forkserver"`: `multiprocessing`'s own, on request.

How a pool ends, and what handles each case:

- `close()`: every socket is closed (idle workers exit on end-of-file), then
  the remaining workers get SIGTERM, then SIGKILL after a short grace.
- The owner is garbage collected, or the interpreter exits: the dataset's
  `weakref.finalize` calls `close()`.
- A worker dies: its sentinel wakes `wait`; its batch fails with
  `WorkerDiedError`, and a new worker takes its place.
- The parent dies, even by SIGKILL: each worker watches the parent's pidfd
  in a thread and exits at once (worker.py).
- Ctrl-C: workers ignore SIGINT; only the parent raises KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from keras_oom import worker as worker_module
from keras_oom.errors import (
    DatasetClosedError,
    RemoteTraceback,
    WorkerDiedError,
    WorkerTimeoutError,
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

# Every open pool of this process: a forked worker closes their sockets, which
# it inherits but must not hold (a held socket hides end-of-file from the
# worker on the other end).
_LIVE_POOLS: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


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


@dataclasses.dataclass
class Completion:
    """The outcome of one request: a batch, or the error that replaced it."""

    key: Any
    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0
    pid: int = 0


class _Worker:
    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.pid: int = process.pid
        self.key: Any = None  # the batch in flight, if any
        self.busy = False
        self.ready = False  # has unpickled the loader and is serving
        self.started = 0.0
        self.batches = 0
        self.busy_seconds = 0.0
        self.reader = BatchReader()


class _SubprocessHandle:
    """The parts of `multiprocessing.Process` the pool uses, for a Popen."""

    def __init__(self, popen: subprocess.Popen, sentinel: int) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.sentinel = sentinel

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

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
    """A fixed number of worker processes that run `loader` on request.

    Not thread-safe: the owning dataset serialises calls with its lock.

    Args:
        loader: Callable run in the workers as `loader(ids)`.
        num_workers: Number of worker processes.
        start_method: One of `START_METHODS`, or `None` to pick per worker
            start with `default_start_method()`.
        timeout: Seconds one batch may take before its worker is replaced,
            or `None` for no limit.
    """

    def __init__(
        self,
        loader: Callable[[Any], Any],
        num_workers: int,
        *,
        start_method: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self._loader = loader
        self._loader_bytes: bytes | None = None
        self._start_method = start_method
        self._timeout = timeout
        self._closed = False
        self._broken: BaseException | None = None
        self._workers: list[_Worker] = []
        # Guards the worker list against close() from another thread (or a
        # finalizer) while the owner replaces a worker.
        self._state_lock = threading.Lock()
        self.started_at = time.perf_counter()
        self._owner_pid = os.getpid()
        _LIVE_POOLS.add(self)
        try:
            for _ in range(num_workers):
                self._workers.append(self._start_worker())
        except BaseException:
            self.close()
            raise

    # -- starting workers ---------------------------------------------------

    def _pickled_loader(self) -> bytes:
        if self._loader_bytes is None:
            import cloudpickle

            try:
                self._loader_bytes = cloudpickle.dumps(self._loader)
            except Exception as e:
                raise TypeError(
                    f"The loader {self._loader!r} cannot be pickled with "
                    f"cloudpickle, which start_method="
                    f"{self._start_method or default_start_method()!r} needs "
                    f"({type(e).__name__}: {e}). Use a loader that pickles, "
                    f"or start_method='fork' before any backend runs."
                ) from e
        return self._loader_bytes

    def _start_worker(self) -> _Worker:
        method = self._start_method or default_start_method()
        parent_sock, child_sock = socket.socketpair()
        conn = Connection(parent_sock.detach())
        try:
            if method == "subprocess":
                process: Any = self._start_subprocess(child_sock, conn)
            else:
                process = self._start_multiprocessing(method, child_sock, conn)
        except BaseException:
            conn.close()
            child_sock.close()
            raise
        return _Worker(process, conn)

    def _start_multiprocessing(
        self, method: str, child_sock: socket.socket, conn: Connection
    ) -> Any:
        ctx: Any = multiprocessing.get_context(method)
        child_conn = Connection(child_sock.detach())
        if method == "fork":
            loader: Any = self._loader
            inherited = [conn.fileno()] + [
                w.conn.fileno()
                for pool in list(_LIVE_POOLS)
                for w in pool._workers
                if not w.conn.closed
            ]
        else:
            loader, inherited = self._pickled_loader(), []
        process = ctx.Process(
            target=worker_module.run,
            args=(child_conn, loader, os.getpid(), inherited),
            name="keras_oom-worker",
            daemon=True,
        )
        try:
            process.start()
        finally:
            child_conn.close()
        return process

    def _start_subprocess(
        self, child_sock: socket.socket, conn: Connection
    ) -> _SubprocessHandle:
        loader = self._pickled_loader()
        child_fd = child_sock.detach()
        code = (
            f"import sys; sys.path[:] = {sys.path!r}; "
            f"from keras_oom.worker import subprocess_main; "
            f"subprocess_main({child_fd}, {os.getpid()})"
        )
        sentinel_r, sentinel_w = os.pipe()  # EOF once the child has exited
        try:
            popen = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=(child_fd, sentinel_w),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(sentinel_r)
            raise
        finally:
            os.close(child_fd)
            os.close(sentinel_w)
        conn.send_bytes(loader)
        return _SubprocessHandle(popen, sentinel_r)

    # -- requests -----------------------------------------------------------

    def idle_count(self) -> int:
        """Number of workers with no batch in flight."""
        return sum(not w.busy for w in self._workers)

    def submit(self, key: Any, ids: Any) -> None:
        """Sends `ids` to an idle worker; the result comes back from `wait`.

        Raises:
            RuntimeError: If no worker is idle, or workers failed to start.
        """
        self._check_open()
        self.raise_if_broken()
        for w in self._workers:
            if not w.busy:
                break
        else:
            raise RuntimeError("submit() needs an idle worker")
        w.busy, w.key, w.started = True, key, time.perf_counter()
        # If the worker died, wait() reports it through its sentinel.
        with contextlib.suppress(OSError):
            w.conn.send((key, ids, w.reader.take_released()))

    def wait(self, timeout: float | None = None) -> list[Completion]:
        """Waits until some request completes, or `timeout` seconds pass.

        Returns:
            The completions that arrived, possibly none after `timeout`.
        """
        self._check_open()
        if not any(w.busy for w in self._workers):
            return []
        if self._timeout is not None:
            nearest = min(self._deadline(w) for w in self._workers if w.busy)
            left = max(0.0, nearest - time.perf_counter())
            timeout = left if timeout is None else min(timeout, left)
        by_handle: dict[Any, _Worker] = {}
        for w in self._workers:
            by_handle[w.conn] = w
            by_handle[w.process.sentinel] = w
        ready = wait(list(by_handle), timeout)
        self._check_open()  # close() from another thread wakes us up
        done: list[Completion] = []
        dead: list[_Worker] = []
        for handle in ready:
            w = by_handle[handle]
            if w in dead:
                continue
            if not self._drain(w, done):
                dead.append(w)
        for w in dead:
            self._replace(w, done)
        if self._timeout is not None:
            now = time.perf_counter()
            for w in list(self._workers):
                if w.busy and now >= self._deadline(w):
                    self._replace(w, done, timed_out=True)
        return done

    def _drain(self, w: _Worker, done: list[Completion]) -> bool:
        """Reads every message `w` has sent; False if `w` is gone."""
        try:
            while w.conn.poll():
                self._handle(w, w.conn.recv(), done)
            return w.process.exitcode is None or w.conn.poll()
        except (EOFError, OSError, RuntimeError):
            # RuntimeError: a descriptor that never came (recv_handle).
            return False

    def _handle(self, w: _Worker, msg: tuple, done: list[Completion]) -> None:
        if msg[0] == "ready":
            w.ready = True
            w.started = time.perf_counter()  # `timeout` counts loading only
            return
        if msg[0] == "start_error":
            error = _rebuild_error(msg[2])
            self._broken = RuntimeError(
                f"A keras_oom worker (pid {w.pid}) failed to start: {error}"
            )
            self._broken.__cause__ = error
            if w.busy:
                done.append(Completion(w.key, error=self._broken, pid=w.pid))
                w.busy, w.key = False, None
            return
        key, seconds, kind, payload = msg
        if kind == "error":
            completion = Completion(key, error=_rebuild_error(payload))
        else:
            completion = Completion(key, value=w.reader.receive(w.conn, kind, payload))
        completion.seconds, completion.pid = seconds, w.pid
        w.busy, w.key = False, None
        w.batches += 1
        w.busy_seconds += seconds
        done.append(completion)

    def _replace(
        self, w: _Worker, done: list[Completion], *, timed_out: bool = False
    ) -> None:
        """Ends `w`, fails its batch, and starts a worker in its place."""
        if timed_out:
            w.process.kill()
        w.process.join(1.0)
        exitcode = w.process.exitcode
        with self._state_lock:
            if w in self._workers:
                self._workers.remove(w)
        _release(w)
        if not w.ready and self._broken is None:
            # It never served: a replacement would most likely fail the same way.
            how = (
                f"did not start within {_START_GRACE + (self._timeout or 0):.0f}s"
                if timed_out
                else _describe_exit(exitcode)
            )
            self._broken = RuntimeError(
                f"A keras_oom worker (pid {w.pid}) {how} before it was ready "
                f"to load; see its output above."
            )
        replaced = self._broken is None and self._start_replacement()
        if not w.busy:
            return
        fate = "it was killed and replaced" if replaced else "it was killed"
        if timed_out:
            error: BaseException = WorkerTimeoutError(
                f"Worker pid {w.pid} took longer than timeout={self._timeout}s; {fate}."
            )
        else:
            error = WorkerDiedError(
                f"Worker pid {w.pid} {_describe_exit(exitcode)}.",
                pid=w.pid,
                exitcode=exitcode,
                batch_index=None,
            )
        done.append(Completion(w.key, error=error, pid=w.pid))

    def _start_replacement(self) -> bool:
        if self._closed:
            return False
        new = self._start_worker()
        with self._state_lock:
            if not self._closed:
                self._workers.append(new)
                return True
        _stop([new])  # closed while it started
        return False

    def _deadline(self, w: _Worker) -> float:
        """When `w`'s batch times out; start-up gets `_START_GRACE` on top."""
        assert self._timeout is not None
        return w.started + self._timeout + (0.0 if w.ready else _START_GRACE)

    def raise_if_broken(self) -> None:
        """Raises the start-up failure that stopped the pool replacing workers."""
        if self._broken is not None:
            raise self._broken

    def _check_open(self) -> None:
        if self._closed:
            raise DatasetClosedError("The dataset's worker pool was closed.")

    # -- observability and shutdown -----------------------------------------

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per worker: pid, batches loaded and seconds spent loading."""
        return [
            {"pid": w.pid, "batches": w.batches, "busy_seconds": w.busy_seconds}
            for w in self._workers
        ]

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    def close(self) -> None:
        """Ends every worker and releases every socket; idempotent.

        Returns within about a second, even while loaders are busy.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            workers, self._workers = self._workers, []
        _LIVE_POOLS.discard(self)
        if os.getpid() != self._owner_pid:
            # A copy in a forked child (the user's os.fork()): the workers
            # belong to the parent; only let go of the inherited sockets.
            for w in workers:
                w.conn.close()
            return
        _stop(workers)


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


def _release(w: _Worker) -> None:
    w.conn.close()
    try:
        w.process.join(0)
        w.process.close()
    except ValueError:  # still running: leave the handle to the GC
        pass


def _rebuild_error(payload: tuple[bytes | None, str, str]) -> BaseException:
    """The worker's exception, its traceback text chained as its cause."""
    pickled, description, tb = payload
    error: BaseException | None = None
    if pickled is not None:
        try:
            error = pickle.loads(pickled)
        except Exception:
            error = None
    if error is None:
        error = RuntimeError(description)
    error.__cause__ = RemoteTraceback(tb)
    return error


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
