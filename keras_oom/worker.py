"""The loop each worker process runs: receive ids, load, send the batch back.

This module runs in the worker processes. It imports neither Keras nor any
deep learning backend, so a worker started as a fresh interpreter is ready in
a fraction of a second and starts no backend threads.

Messages on a worker's socket (see `pool.py` for the parent's side):

    parent -> worker   (key, ids, released)  load `ids`; `key` names the batch;
                                             `released` buffers are free again
                       None                  exit
    worker -> parent   ("ready", pid)        set up, loader unpickled
                       ("start_error", pid, error)   setup failed; exits
                       (key, seconds, "inline", pickle)
                       (key, seconds, "memfd", layout) [+ descriptor]
                       (key, seconds, "error", error)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from keras_oom.transport import BatchWriter


def run(
    conn: Connection,
    loader: Any,
    parent_pid: int,
    inherited_fds: Sequence[int] = (),
) -> None:
    """Serves load requests on `conn` until told to stop or the parent is gone.

    Args:
        conn: The worker's end of its socket to the parent.
        loader: The loader, or its `cloudpickle` bytes when the worker was
            not forked from the parent.
        parent_pid: Pid of the process that owns the pool.
        inherited_fds: The parent's ends of worker sockets, inherited by a
            fork, to close here.
    """
    for fd in inherited_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    # Ctrl-C in a terminal reaches the whole process group; only the parent
    # should react to it, with one clean KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _exit_with_parent(parent_pid)
    _keep_large_allocations_on_heap()
    try:
        try:
            if isinstance(loader, bytes):
                loader = pickle.loads(loader)
            if not callable(loader):
                raise TypeError(f"loader is not callable: {loader!r}")
        except Exception as e:
            conn.send(("start_error", os.getpid(), _error_payload(e)))
            return
        conn.send(("ready", os.getpid()))
        _serve(conn, loader)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        # The parent closed the pool, possibly mid-batch: nothing to report.
        return


def _serve(conn: Connection, loader: Callable[[Any], Any]) -> None:
    writer = BatchWriter()
    while True:
        request = conn.recv()
        if request is None:
            return
        key, ids, released = request
        writer.release(released)
        start = time.perf_counter()
        try:
            value = loader(ids)
        except Exception as e:
            conn.send((key, time.perf_counter() - start, "error", _error_payload(e)))
            continue
        seconds = time.perf_counter() - start
        try:
            writer.send(conn, (key, seconds), value)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:  # the batch does not pickle
            conn.send((key, seconds, "error", _error_payload(e)))


def _error_payload(e: BaseException) -> tuple[bytes | None, str, str]:
    """The exception pickled (or None), its type name and its traceback."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    pickled: bytes | None
    try:
        pickled = pickle.dumps(e)
        pickle.loads(pickled)  # must also come back in the parent
    except Exception:
        pickled = None
    return pickled, f"{type(e).__module__}.{type(e).__qualname__}: {e}", tb


def _exit_with_parent(parent_pid: int) -> None:
    """Ends this worker within a moment of the parent's death, even mid-load.

    A pidfd becomes readable when the process exits, so a thread blocked on
    it wakes at once; where pidfds are missing, poll the parent's pid. Either
    way the worker leaves with `os._exit`, skipping cleanup that could hang.
    The wait is `poll()`, not `select()`: a process with many open files
    gets a pidfd numbered 1024 or above, which `select()` refuses.
    """
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            try:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                poller.poll()
                os._exit(1)
            except (OSError, ValueError):
                pass  # never leave the worker unwatched: poll the pid below
        while os.getppid() == parent_pid or _alive(parent_pid):
            time.sleep(0.25)
        os._exit(1)

    threading.Thread(target=watch, name="keras_oom-parent-watch", daemon=True).start()


def _keep_large_allocations_on_heap() -> None:
    """Stops glibc from mapping and unmapping every large NumPy temporary.

    By default glibc serves allocations above a threshold (128 KiB, adapting
    upwards only to sizes already freed) with a fresh mmap, and returns them
    to the kernel on free. A loader making MiB-sized arrays then pays a page
    fault and a zeroed page per 4 KiB on every batch: measured here, 19 ms
    against 4.5 ms for the same loader in a process whose heap was warm.
    Fixed thresholds keep such arrays on the heap and reuse their pages.
    A user's own MALLOC_* environment settings win.
    """
    if not sys.platform.startswith("linux") or any(
        k.startswith("MALLOC_") for k in os.environ
    ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit
    mallopt(m_trim_threshold, 64 << 20)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def subprocess_main(fd: int, parent_pid: int) -> None:
    """Entry point of a worker started as a fresh interpreter.

    The parent passes the socket as file descriptor `fd`; the first message
    on it is the loader, pickled by value with `cloudpickle`.
    """
    conn = Connection(fd)
    try:
        loader = conn.recv_bytes()
    except EOFError:
        sys.exit(0)
    run(conn, loader, parent_pid)
