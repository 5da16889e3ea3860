"""The public exceptions of keras-oom.

How a failure in a worker is encoded, sent and rebuilt in the caller lives
beside the other messages in `protocol.py`. The wording of a worker's exit
(`describe_exit`, `likely_causes`, `loss_error`) is here, beside the error
it explains.
"""

from __future__ import annotations

import os
import signal

from keras_oom.per_process import Owner
from keras_oom.protocol import add_note


class WorkerDiedError(RuntimeError):
    """A worker process ended while it was loading a batch.

    Raised in the caller for the batch the worker held, when the worker was
    killed by a signal (the OOM killer, `kill -9`), called `os._exit`, or
    crashed in native code. The pool replaces the worker, so later batches
    still load.

    Attributes:
        pid: Process id of the worker that died.
        exitcode: Its exit code; negative for a signal (`-9` is `SIGKILL`),
            `None` if unknown.
        batch_index: Index of the batch it was loading, or `None`.
    """

    def __init__(
        self, message: str, *, pid: int, exitcode: int | None, batch_index: object
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.batch_index = batch_index

    def __reduce__(self):  # keep the attributes across pickling
        return (
            _rebuild_worker_died,
            (str(self), self.pid, self.exitcode, self.batch_index),
        )


def _rebuild_worker_died(message, pid, exitcode, batch_index):
    return WorkerDiedError(message, pid=pid, exitcode=exitcode, batch_index=batch_index)


class WorkerTimeoutError(TimeoutError):
    """A worker took longer than `timeout` seconds to load one batch.

    The stuck worker is terminated and replaced, so later batches still load.
    """


class WorkerStartError(RuntimeError):
    """The pool could not keep its workers running, so it stopped trying.

    Raised by every read once workers kept failing to start: a start that
    raised (the loader does not pickle, no process can be created), or
    workers that died before they were ready, several times in a row. When
    `worker_init` or unpickling the loader raised in the worker, the first
    read raises that exception itself, with the worker's traceback in its
    notes, and later reads raise this error with it as the cause.
    """


class DatasetClosedError(RuntimeError):
    """The dataset was used after `close()` ended its workers."""


def unusable_error(owner: Owner, closed: bool) -> RuntimeError | None:
    """Why a `PrefetchLoaderDataset` cannot serve reads here, or None.

    Args:
        owner: The process that made the dataset (its workers serve only
            that process; a fork inherits the dataset, not them).
        closed: Whether `close()` ended its workers.

    Returns:
        A `RuntimeError` for a fork of the owner, a `DatasetClosedError`
        after `close()`, or None when the dataset can serve.
    """
    if not owner.here():
        return RuntimeError(
            f"This PrefetchLoaderDataset belongs to process {owner.pid}; "
            f"this is process {os.getpid()}, a fork of it. Its workers "
            f"serve only their owner: build a new dataset in this process."
        )
    if closed:
        return DatasetClosedError(
            "This PrefetchLoaderDataset was closed: its worker processes "
            "are gone. Build a new dataset to load more batches."
        )
    return None


def describe_exit(exitcode: int | None) -> str:
    """How a process ended, e.g. `"was killed by SIGKILL (exit code -9)"`."""
    if exitcode is None:
        return "stopped responding"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def likely_causes(exitcode: int | None) -> str:
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


def loss_error(
    pid: int, exitcode: int | None, timed_out: bool, timeout: float | None
) -> WorkerDiedError | WorkerTimeoutError:
    """The error of a batch whose worker died, or outlived `timeout` seconds.

    Args:
        pid: The worker's process id.
        exitcode: Its exit code (`None` if unknown).
        timed_out: Whether it was killed for taking longer than `timeout`.
        timeout: The per-batch limit in seconds, named in the message.
    """
    if timed_out:
        return WorkerTimeoutError(
            f"Worker pid {pid} took longer than timeout={timeout}s and was killed."
        )
    return WorkerDiedError(
        f"Worker pid {pid} {describe_exit(exitcode)}.{likely_causes(exitcode)}",
        pid=pid,
        exitcode=exitcode,
        batch_index=None,
    )


def for_batch(
    error: BaseException, index: int, ids: str, pid: int | None
) -> BaseException:
    """The error to raise for batch `index`, naming it and its ids.

    A died or timed-out worker's error is raised anew with the batch in its
    message (its pid is named already); any other error (the loader's, of
    any class) is raised itself, with a note naming the batch and worker.

    Args:
        error: The batch's error, from its worker or the pool.
        index: The batch's index, as the caller asked for it.
        ids: Its sample ids, described (`protocol.describe_ids`).
        pid: The worker that loaded it, or None.
    """
    what = f"batch {index}, ids {ids}"
    if isinstance(error, WorkerDiedError):
        return WorkerDiedError(
            f"{error} It was loading {what}.",
            pid=error.pid,
            exitcode=error.exitcode,
            batch_index=index,
        )
    if isinstance(error, WorkerTimeoutError):
        return WorkerTimeoutError(f"{error} It was loading {what}.")
    if pid:
        what += f", in worker pid {pid}"
    add_note(error, f"keras_oom: while loading {what}")
    return error
