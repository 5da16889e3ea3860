"""The loop each worker process runs: receive ids, load, send the batch back.

This module runs in the worker processes. It imports neither Keras nor any
deep learning backend, so a worker started as a fresh interpreter is ready in
a fraction of a second and starts no backend threads. The messages it sends
and receives are in `protocol.py`.

Before each batch the worker reseeds NumPy's global generator, `random`
and (if the loader imported it) torch's from the batch's `(seed, epoch,
position)`, so a loader that draws from them gets a stream of its own per
batch, whichever worker runs it: forked workers do not share the parent's
state, and fresh interpreters do not draw from OS entropy.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import functools
import os
import pickle
import select
import signal
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from keras_oom import seeding, transport
from keras_oom.protocol import Failed, Loaded, Ready, StartFailed, encode_error
from keras_oom.source import call_loader


def run(
    conn: Connection,
    setup: Any,
    parent_pid: int,
    index: int,
    inherited_fds: Sequence[int] = (),
) -> None:
    """Serves load requests on `conn` until told to stop or the parent is gone.

    Args:
        conn: The worker's end of its socket to the parent.
        setup: The pool's `WorkerSetup` (loader, worker_init), or its
            `cloudpickle` bytes when the worker was not forked.
        parent_pid: Pid of the process that owns the pool.
        index: The worker's slot, passed to `worker_init`.
        inherited_fds: The parent's ends of worker sockets, inherited by a
            fork, to close here.
    """
    # Ctrl-C in a terminal reaches the whole process group; only the parent
    # should react to it, with one clean KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A forked worker inherits the parent's mappings of other workers'
    # batches (and of closed datasets'): let them go, or they stay pinned.
    transport.forget_inherited_mappings()
    for fd in inherited_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _exit_with_parent(parent_pid)
    _keep_large_allocations_on_heap()
    with contextlib.suppress(Exception):  # a crash in native code leaves a stack
        faulthandler.enable()
    try:
        try:
            if isinstance(setup, bytes):
                setup = pickle.loads(setup)
            loader, worker_init = setup
            if not callable(loader):
                raise TypeError(f"loader is not callable: {loader!r}")
            if worker_init is not None:
                worker_init(index)
        except Exception as e:
            conn.send(StartFailed(os.getpid(), encode_error(e)))
            return
        conn.send(Ready(os.getpid()))
        _serve(conn, loader)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        # The parent closed the pool, possibly mid-batch: nothing to report.
        return


def _serve(conn: Connection, loader: Any) -> None:
    writer = transport.BatchWriter()
    writer.activate()  # `batch_array` allocates in its buffers from now on
    wants_rng = seeding.accepts_rng(loader)
    while True:
        request = conn.recv()
        if request is None:
            return
        writer.release(request.released)
        seeding.seed_global_generators(seeding.batch_seed(*request.seed))
        key, start = request.key, time.perf_counter()
        try:
            value = call_loader(loader, wants_rng, request.ids, request.seed)
        except Exception as e:
            seconds = time.perf_counter() - start
            conn.send(Failed(key, seconds, time.process_time(), encode_error(e)))
            continue
        seconds = time.perf_counter() - start
        cpu = time.process_time()
        try:
            try:
                message = functools.partial(Loaded, key, seconds, cpu)
                outgoing = writer.prepare(message, value)
            finally:
                # Drop the batch before it travels: a buffer the loader
                # still holds after this is made private to the worker
                # first (transport.py), and one it does not hold is free
                # for the next batch once the parent lets it go.
                del value
            writer.transmit(conn, outgoing)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:  # the batch does not pickle
            conn.send(Failed(key, seconds, cpu, encode_error(e)))


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


def subprocess_main(fd: int, parent_pid: int, index: int) -> None:
    """Entry point of a worker started as a fresh interpreter.

    The parent passes the socket as file descriptor `fd`; the first message
    on it is the setup, pickled by value with `cloudpickle`.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        setup = conn.recv_bytes()
    except EOFError:
        sys.exit(0)
    run(conn, setup, parent_pid, index)
