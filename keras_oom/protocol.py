"""What the pool and its workers say to each other, and how failures travel.

One socket joins the parent to each worker. Every message is one of the
types below, pickled by `multiprocessing.connection.Connection`; a batch's
array data goes beside it through shared memory (`transport.py`).

    parent -> worker   Load(key, ids, released, seed, state)
                                                       load `ids` as batch `key`
                       None                            exit
    worker -> parent   Ready(pid)                      set up; serving
                       StartFailed(pid, error)         setup raised; exiting
                       Loaded(key, seconds, cpu, kind, payload) [+ descriptor]
                       Failed(key, seconds, cpu, error)  the loader raised

A worker answers each `Load` with exactly one `Loaded` or `Failed`, so the
parent always knows which batch a worker holds. An exception crosses as an
`ErrorPayload` and is rebuilt by `decode_error`, its encoder's neighbour here
as in CPython's `concurrent.futures.process`.

This module runs in workers too: it imports neither Keras nor a backend.
"""

from __future__ import annotations

import os
import pickle
import traceback
from typing import Any, NamedTuple


class Load(NamedTuple):
    key: Any  # (epoch, batch), the parent's name for the batch
    ids: Any  # the batch's sample ids
    released: list[int]  # shared-memory buffers the parent has let go of
    seed: tuple[int, int, int]  # (seed, epoch, position): see seeding.py
    state: tuple = ()  # changed loader state to set first: see state.py


class Ready(NamedTuple):
    pid: int


class StartFailed(NamedTuple):
    pid: int
    error: ErrorPayload


class Loaded(NamedTuple):
    key: Any
    seconds: float  # wall time of the loader call
    cpu: float  # the worker's CPU time so far, for stats()
    kind: str  # "inline" or "memfd": see transport.py
    payload: Any


class Failed(NamedTuple):
    key: Any
    seconds: float
    cpu: float
    error: ErrorPayload


class ErrorPayload(NamedTuple):
    pickled: bytes | None  # the exception itself, if it survives a round trip
    description: str  # "module.Type: message", for when it does not
    traceback: str  # the whole traceback, as text
    frames: str  # the loader's own frames and the error line, for a note


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, as text.

    Chained as the `__cause__` of the exception re-raised in the caller, so
    that a report that shows causes shows where in the loader it failed.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def encode_error(e: BaseException) -> ErrorPayload:
    """Describes `e` for the parent; never raises, whatever `e` does."""
    summary = traceback.extract_tb(e.__traceback__)
    own = [f for f in summary if not f.filename.startswith(_PACKAGE_DIR)]
    headline = f"{type(e).__module__}.{type(e).__qualname__}: {_safe_str(e)}"
    try:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    except Exception:  # a __str__ or __repr__ that raises
        tb = "Traceback (most recent call last):\n" + "".join(summary.format())
        tb += headline + "\n"
    frames = "".join(traceback.format_list(own or summary)) + headline
    pickled: bytes | None
    try:
        pickled = pickle.dumps(e)
        pickle.loads(pickled)  # it must also come back in the parent
    except BaseException:
        pickled = None
    return ErrorPayload(pickled, headline, tb, frames)


def decode_error(payload: ErrorPayload, where: str) -> BaseException:
    """Rebuilds the worker's exception for the caller.

    It keeps its type where it unpickles (else a `RuntimeError` with its
    description), its traceback text as `__cause__`, and a PEP 678 note with
    the loader's frames: notes survive Keras's traceback filtering, which
    re-raises `from None` and so drops the cause.

    Args:
        payload: What `encode_error` made in the worker.
        where: Which worker, for the note, e.g. `"worker 0 (pid 123)"`.
    """
    error: BaseException | None = None
    if payload.pickled is not None:
        try:
            error = pickle.loads(payload.pickled)
        except Exception:
            error = None
    if error is None:
        error = RuntimeError(payload.description)
    error.__cause__ = RemoteTraceback(payload.traceback)
    add_note(
        error,
        f"keras_oom: raised in {where}, traceback (most recent call last):\n"
        f"{payload.frames}",
    )
    return error


def _safe_str(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:
        return f"<{type(e).__name__}: str() failed>"


def add_note(exc: BaseException, note: str) -> None:
    """Attaches `note` to `exc` (PEP 678), also on Python 3.10."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # pragma: no cover - Python 3.10
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


def describe_ids(ids: Any, limit: int = 3) -> str:
    """A short, printable preview of a batch's sample ids."""
    shown = ", ".join(repr(i.item() if hasattr(i, "item") else i) for i in ids[:limit])
    more = f", ... ({len(ids)} ids)" if len(ids) > limit else ""
    return f"[{shown}{more}]"
