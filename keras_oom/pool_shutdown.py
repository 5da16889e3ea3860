"""How the local pool's workers end: every way a pool can end, and what
handles each.

Every process the pool (process_pool.py) starts is ended and reaped by the
pool, whichever way it leaves, with its process group (the processes its
loader started). `stop()` ends many at once (`close()`), `release()` ends
one for good, once, whoever calls first.

The cases:

- `close()`: each worker gets a goodbye (`None`) and its socket is closed
  (idle workers exit, running their clean-up), then the remaining groups
  get SIGTERM, then `release` kills what is left of each group (SIGKILL)
  and reaps the worker. It may come from another thread while the owner
  waits: the owner wakes with `DatasetClosedError`. Each worker is
  released exactly once, and a worker started while close() runs is
  ended by its starter.
- The owner is garbage collected, or the interpreter exits: the dataset's
  `weakref.finalize` calls `close()`. (`multiprocessing`'s exit handler,
  which joins non-daemonic children, does not know the workers.)
- A worker dies (a crash, the OOM killer, a kill by hand): its pidfd wakes
  `wait`, `ProcessPool._lose` kills what is left of its group, and the
  worker index restarts.
- A worker's stream breaks while it runs (a reply that does not decode),
  or its batch outlives `timeout`: `ProcessPool._lose` ends it, with its
  group.
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
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from keras_oom import processes
from keras_oom.processes import Process, close_conn

# close(): how long idle workers get to exit on their own, then how long
# SIGTERM gets before SIGKILL.
_EXIT_GRACE = 0.1
_TERM_GRACE = 0.5


class Ending(Protocol):
    """A worker as the pool holds it (`pool_worker.PoolWorker`)."""

    process: Process
    conn: Connection
    released: bool


def stop(workers: Sequence[Ending]) -> None:
    """Ends `workers`: end-of-file, then SIGTERM, then SIGKILL.

    Each signal goes to a worker's whole process group, and `release`
    ends what is left of the group even after a clean exit: processes the
    loader started do not outlive their worker.
    """
    for w in workers:
        # Goodbye first: an idle worker exits as asked, its loader's clean-up
        # included; end-of-file alone would tell it that the parent died.
        with contextlib.suppress(OSError, ValueError):
            w.conn.send(None)
        close_conn(w.conn)
    _join_all(workers, _EXIT_GRACE)
    for w in workers:
        if w.process.exitcode is None:
            w.process.terminate()
    _join_all(workers, _TERM_GRACE)
    for w in workers:
        release(w)


def _join_all(workers: Sequence[Ending], seconds: float) -> None:
    alive: list[Any] = [
        w.process.sentinel for w in workers if w.process.exitcode is None
    ]
    deadline = time.monotonic() + seconds
    while alive:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for s in wait(alive, left):
            alive.remove(s)


def release(w: Ending) -> None:
    """Ends `w` for good, once, whoever calls first: closes its socket,
    kills what is left of its process group, reaps it."""
    with processes.RELEASE_LOCK:
        if w.released:
            return
        w.released = True
    close_conn(w.conn)
    w.process.close()
    processes.reap_leftovers()
