"""The exceptions keras-oom raises, and how worker failures reach the caller."""

from __future__ import annotations


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


class DatasetClosedError(RuntimeError):
    """The dataset was used after `close()` ended its workers."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, as text.

    Chained as the `__cause__` of the exception re-raised in the caller, so
    that the report shows where in the loader the error happened.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def add_note(exc: BaseException, note: str) -> None:
    """Attaches `note` to `exc` (PEP 678), also on Python 3.10."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # pragma: no cover - Python 3.10
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


def describe_ids(ids, limit: int = 3) -> str:
    """A short, printable preview of a batch's sample ids."""
    shown = ", ".join(repr(i.item() if hasattr(i, "item") else i) for i in ids[:limit])
    more = f", ... ({len(ids)} ids)" if len(ids) > limit else ""
    return f"[{shown}{more}]"
