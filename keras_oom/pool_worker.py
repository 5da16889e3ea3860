"""One worker process as the local pool (process_pool.py) holds it.

Its handles (the process and the parent's end of its socket), where it
stands (starting, ready, busy with one load), its counters for `stats()`,
and how one of its replies becomes an `Outcome`: a `Loaded` batch received
from the socket and shared memory (transport.py), or a `Failed` load's
error decoded. Which key it loads is the engine's to know, not the pool's.
"""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from typing import Any

from keras_oom.processes import Process
from keras_oom.protocol import Failed, Loaded, Outcome, add_note, decode_error
from keras_oom.transport import BatchReader

# A worker's start-up (a fresh interpreter importing what the loader needs)
# does not count against `timeout`; this bounds it instead.
START_GRACE = 60.0


class PoolWorker:
    """One worker process of the local pool, and what the pool knows of it.

    Args:
        worker_index: Its index in `range(num_workers)`.
        process: Its process handle (processes.py).
        conn: The parent's end of its socket.
    """

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

    def deadline(self, timeout: float) -> float:
        """When its batch outlives `timeout` seconds (`time.perf_counter()`);
        start-up gets `START_GRACE` on top."""
        return self.started + timeout + (0.0 if self.ready else START_GRACE)

    def finished(self, msg: Loaded | Failed) -> Outcome:
        """Its load ended with `msg`: the outcome, and the worker idle.

        Raises:
            EOFError, ConnectionError: If the stream ended mid-reply (the
                worker died while sending): the pool loses the worker.
        """
        if isinstance(msg, Failed):
            outcome = Outcome(error=decode_error(msg.error, str(self)))
        else:
            outcome = self._receive(msg)
        outcome.seconds, outcome.pid = msg.seconds, self.pid
        self.cpu_seconds = msg.cpu
        self.busy = False
        self.batches += 1
        self.busy_seconds += msg.seconds
        return outcome

    def _receive(self, msg: Loaded) -> Outcome:
        """The batch of `msg`, or the error that receiving it raised."""
        outcome = Outcome()
        try:
            outcome.value = self.reader.receive(self.conn, msg.kind, msg.payload)
        except (EOFError, ConnectionError):
            # The stream ended mid-reply: not the batch's fault. The caller
            # loses the worker, and the batch ends with `WorkerDiedError`.
            raise
        except BaseException as e:
            # The batch does not unpickle here (its `__setstate__` or rebuild
            # raised, of any class: SIGINT is deferred, so even a
            # KeyboardInterrupt is the batch's own), or its shared memory
            # could not be received (transport.py says why; the stream stays
            # in step). It fails that batch only; the worker is fine.
            how = "received" if isinstance(e, OSError) else "unpickled"
            add_note(
                e, f"keras_oom: the batch from {self} could not be {how} in the parent"
            )
            outcome.error = e
        return outcome

    def stats(self) -> dict[str, Any]:
        """Its line of `ProcessPool.worker_stats()`."""
        return {
            "index": self.worker_index,
            "pid": self.pid,
            "batches": self.batches,
            "busy_seconds": self.busy_seconds,
            "cpu_seconds": self.cpu_seconds,
        }
