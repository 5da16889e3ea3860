"""The loop each worker process runs: receive ids, load, send the batch back.

This module runs in the worker processes. It imports neither Keras nor any
deep learning backend, so a worker started as a fresh interpreter is ready in
a fraction of a second and starts no backend threads. The messages it sends
and receives are in `protocol.py`.

A worker first closes the pool's descriptors a fork copied into it, then
leads a session and process group of its own (`_lead_own_group`): the
processes its loader starts share that group, and the pool ends them all
together. It is not a daemonic process, so a loader may start processes.
A goodbye (`None`) from the pool ends it normally; a stream that just ends,
or its parent's death (watched through a pidfd), makes it kill its whole
group at once (`_end_group`), since nobody else would end those processes.

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
from typing import Any, cast

from keras_oom import seeding, transport
from keras_oom.protocol import (
    Failed,
    Load,
    Loaded,
    Ready,
    StartFailed,
    encode_error,
    unpack_ids,
)
from keras_oom.source import call_loader
from keras_oom.state import apply_state


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
        inherited_fds: The pool's descriptors that a fork copied into this
            worker, to close here: the parent ends of every worker socket
            (this worker's own among them) and the pool's pidfds.
    """
    # First of all: a parent end held here hides end-of-file from the worker
    # on the other end, this one included, which would never learn that the
    # pool let it go.
    own = conn.fileno()
    for fd in inherited_fds:
        if fd != own:
            with contextlib.suppress(OSError):
                os.close(fd)
    _lead_own_group()
    # Ctrl-C in a terminal reaches the whole process group; only the parent
    # should react to it, with one clean KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A forked worker inherits the parent's mappings of other workers'
    # batches (and of closed datasets'): let them go, or they stay pinned.
    transport.forget_inherited_mappings()
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
        except BaseException as e:  # any class: the pool must hear why
            conn.send(StartFailed(os.getpid(), encode_error(e)))
            return
        conn.send(Ready(os.getpid()))
        _serve(conn, loader)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        # The pool says goodbye (`None`, see `_serve`) before it closes the
        # socket. A stream that just ends means that the parent died, or
        # that the pool gave up on this worker: nobody will end the
        # processes the loader started, so end them now, with the worker.
        _end_group()


def _serve(conn: Connection, loader: Any) -> None:
    """Answers each request with exactly one `Loaded` or `Failed`.

    An exception of any class while one batch is handled (unpickling its
    ids, the loader, pickling the batch) fails that batch and the worker
    serves on: SIGINT is ignored here, so even a `KeyboardInterrupt` or a
    `SystemExit` is the loader's own error, for the caller to see. Only a
    reply that fails after part of it went out ends the worker, as a broken
    socket does: the parent could no longer read the stream in step.
    """
    writer = transport.BatchWriter()
    writer.activate()  # `batch_array` allocates in its buffers from now on
    wants_rng = seeding.accepts_rng(loader)
    while True:
        request = conn.recv()
        if request is None:  # the pool closes: exit, cleaning up as usual
            return
        writer.release(request.released)
        key, start = request.key, time.perf_counter()
        try:
            value = build_batch(loader, wants_rng, request)
        except BaseException as e:
            seconds = time.perf_counter() - start
            conn.send(Failed(key, seconds, time.process_time(), encode_error(e)))
            continue
        seconds = time.perf_counter() - start
        cpu = time.process_time()
        reply = _WatchedConnection(conn)
        message = functools.partial(Loaded, key, seconds, cpu)
        try:
            try:
                outgoing = writer.prepare(message, value)
            finally:
                # Drop the batch before it travels: a buffer the loader
                # still holds after this is made private to the worker
                # first (transport.py), and one it does not hold is free
                # for the next batch once the parent lets it go.
                del value
            writer.transmit(cast(Connection, reply), outgoing)
        except BaseException as e:
            if reply.used:  # part of the reply may be out: the stream is broken
                raise
            # Nothing was sent (the batch did not pickle): fail it, serve on.
            conn.send(Failed(key, seconds, cpu, encode_error(e)))


def build_batch(loader: Any, wants_rng: bool, request: Load) -> Any:
    """What the loader returns for `request`: the one recipe of a batch.

    Reseeds the global generators from the batch's seed, unpickles its ids,
    applies the loader state that changed in the parent (state.py), then
    calls the loader. Every executor's workers build batches here (the Ray
    actors too, keras_oom/ray.py), so they are the same by construction.

    Raises:
        BaseException: Whatever unpickling the ids, the state or the loader
            raised; the caller fails that batch.
    """
    seeding.seed_global_generators(seeding.batch_seed(*request.seed))
    ids = unpack_ids(request.ids)
    if request.state:  # what changed in the parent since: state.py
        apply_state(loader, request.state)
    return call_loader(loader, wants_rng, ids, request.seed)


def _lead_own_group() -> None:
    """Makes this worker the leader of a session and process group of its own.

    The pool then ends the worker with every process its loader started
    (they inherit the group) by signalling the group, and a terminal's
    Ctrl-C, sent to the terminal's group, never reaches them. A worker
    started as a fresh interpreter already leads one (`setsid` then fails,
    harmlessly).
    """
    with contextlib.suppress(OSError):
        os.setsid()


def _end_group() -> None:
    """Ends this worker at once, with every process of its group.

    Only where the worker leads its group (else the group is someone
    else's); either way the worker leaves with `os._exit`, skipping cleanup
    that could hang.
    """
    with contextlib.suppress(OSError):
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(1)


class _WatchedConnection:
    """A connection that notes whether anything used it.

    `BatchWriter.transmit` raises before or while it writes: an error
    raised while nothing used the connection left nothing in the socket,
    and the worker can answer `Failed` instead.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.used = False

    def __getattr__(self, name: str) -> Any:
        self.used = True
        return getattr(self._conn, name)


def _exit_with_parent(parent_pid: int) -> None:
    """Ends this worker within a moment of the parent's death, even mid-load.

    A pidfd becomes readable when the process exits, so a thread blocked on
    it wakes at once; where pidfds are missing, poll the parent's pid. Then
    the worker ends its whole process group (`_end_group`): the processes
    its loader started go with it. The wait is `poll()`, not `select()`: a
    process with many open files gets a pidfd numbered 1024 or above, which
    `select()` refuses.
    """
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        _end_group()
    except (AttributeError, OSError):
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            try:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                poller.poll()
                _end_group()
            except (OSError, ValueError):
                pass  # never leave the worker unwatched: poll the pid below
        while os.getppid() == parent_pid or _alive(parent_pid):
            time.sleep(0.25)
        _end_group()

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
