"""A worker process as the local pool holds it, and the descriptors it owns.

`Process` wraps whatever started a worker (`multiprocessing`, or
`subprocess` for a fresh interpreter) behind one handle: a sentinel that
turns readable when it exits (a pidfd where the kernel has them), signals to
its whole process group, and a `close()` after which nothing of it runs.

`LAUNCH_LOCK` and `OWNED_FDS` are this process's register of the pool's
descriptors (the parent ends of worker sockets, pidfds), which a forked
worker must close first (launch.py). `reset_after_fork()` gives a child of
the user's `os.fork()` fresh locks and forgets the parent's leftovers; the
at-fork hook that calls it is in launch.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
from multiprocessing.connection import Connection, wait
from typing import Any

# How long a SIGKILLed process may take to die before it is left to be
# reaped later.
KILL_GRACE = 1.0

# How long the fork server may take to report the status of a child that
# has exited.
STATUS_GRACE = 5.0

# The descriptors the pool holds in this process: the parent ends of worker
# sockets, and pidfds. A forked worker inherits every descriptor of its
# parent and must close these first: holding a parent end (its own among
# them) hides end-of-file from the worker on the other end, which then
# never learns that the pool let it go. `LAUNCH_LOCK` makes "open and
# register", "unregister and close" and "list and fork" atomic with respect
# to each other, so a fork never misses a descriptor, nor passes a stale
# number that names something else by then.
LAUNCH_LOCK = threading.RLock()
OWNED_FDS: set[int] = set()
# One thread releases each worker, and reaps each leftover.
RELEASE_LOCK = threading.Lock()


class Process:
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
            if self._process is not None and not self._own_child:
                # The fork server reaps its child and reports the status on
                # the sentinel pipe only after its SIGCHLD: under load that
                # comes after the pidfd turned readable. Wait for the report
                # (the code tells an unguarded script's re-run from a crash).
                self._process.join(STATUS_GRACE)
                code = self._process.exitcode
            if code is None:
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

        Returns within about `KILL_GRACE` seconds; a process that is not
        dead by then (stuck in the kernel) is reaped by a later release.
        """
        if self._closed:
            return
        self._closed = True
        self.kill()
        self.join(KILL_GRACE)
        if self.exitcode is None:
            _UNREAPED.append(self)
            return
        self._reap()

    def _reap(self) -> None:
        if self._process is not None:
            if self._own_child:
                self._process.exitcode  # noqa: B018  (waitpid: it has exited)
            else:  # the fork server reports the status on its own pipe
                self._process.join(KILL_GRACE)
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
                close_fd(fd)
        self._pidfd = self._pipe = None


# Processes killed but not yet dead when released: reaped by a later release.
_UNREAPED: list[Process] = []


def reap_leftovers() -> None:
    for p in list(_UNREAPED):
        if p.exitcode is None:
            continue
        with RELEASE_LOCK:  # one thread reaps each
            if p not in _UNREAPED:
                continue
            _UNREAPED.remove(p)
        p._reap()


def pidfds_work() -> bool:
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
    if not pidfds_work():
        return None
    with LAUNCH_LOCK:
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone already: the start method's sentinel tells
            return None
        OWNED_FDS.add(fd)
    return fd


def new_connection() -> tuple[Connection, socket.socket]:
    """A socket pair: the parent's end (registered) and the child's."""
    with LAUNCH_LOCK:
        parent_sock, child_sock = socket.socketpair()
        conn = Connection(parent_sock.detach())
        OWNED_FDS.add(conn.fileno())
    return conn, child_sock


def close_conn(conn: Connection) -> None:
    with LAUNCH_LOCK:
        if conn.closed:
            return
        OWNED_FDS.discard(conn.fileno())
        conn.close()


def close_fd(fd: int) -> None:
    with LAUNCH_LOCK:
        OWNED_FDS.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


def reset_after_fork() -> None:
    """In a child of a fork: fresh locks, and none of the parent's leftovers.

    Another thread may have held a lock at the fork; in the child nobody
    would release it. The processes waiting to be reaped are the parent's.
    """
    global LAUNCH_LOCK, RELEASE_LOCK
    LAUNCH_LOCK = threading.RLock()
    RELEASE_LOCK = threading.Lock()
    _UNREAPED.clear()
