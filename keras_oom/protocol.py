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
                       Failed(key, seconds, cpu, error)  the batch failed

A worker answers each `Load` with exactly one `Loaded` or `Failed`, so the
parent always knows which batch a worker holds. An exception crosses as an
`ErrorPayload` and is rebuilt by `decode_error`, its encoder's neighbour here
as in CPython's `concurrent.futures.process`.

Beside the messages, what an executor tells the engine (executor.py): one
event per thing that happened, in the parent, whichever executor runs the
workers:

    Joined(worker_index)                 ready for its first load
    Arrived(worker_index, key, Outcome)  a load answered (a batch or an error)
    Lost(worker_index, Outcome | None)   the worker is gone, with the error
                                         for the load it held (None: resend)

How failures travel: an exception of any class (`BaseException` included)
raised while one batch is handled ends that batch, and only that batch:

- pickling the request, in the parent: the ids travel pickled on their own
  (`pack_ids`), pickled before the worker is marked busy, so ids that do not
  pickle fail their batch with the pickling error and the worker stays idle;
- unpickling the ids in the worker, the loader, pickling the batch: the
  worker answers `Failed` and keeps serving. Workers ignore SIGINT, so a
  `KeyboardInterrupt` or `SystemExit` there comes from the loader (or the
  ids, or the batch) and is that batch's error, not a reason to exit. Only
  a reply that fails after part of it was sent ends the worker: the socket
  can no longer be read in step, and the parent reports the worker lost;
- unpickling the batch in the parent: that unpickling error is the batch's
  error, and the worker keeps serving (pool.py);
- rebuilding the worker's exception in the parent (`decode_error`): it
  comes back as itself when it unpickles, by `pickle` or, where `pickle`
  refuses (a frozen dataclass, an `__init__` taking other arguments), from
  its class, arguments and attributes; else a `RuntimeError` naming it
  stands in for it;
- decorating it (`add_note`, `describe_ids`): never raises, whatever the
  exception or the ids refuse, so the caller raises the user's exception.

What the caller sees for a `BaseException` raised by the loader in a worker
(`KeyboardInterrupt`, `SystemExit`, `GeneratorExit` or one of its own): the
same class, re-raised with notes, as `LoaderDataset` raises it. The note
"raised in worker N (pid P)" and the worker's traceback as `__cause__` tell
it from this process's own Ctrl-C.

This module runs in workers too: it imports neither Keras nor a backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import signal
import threading
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple


class WorkerSetup(NamedTuple):
    """What every worker needs before its first batch: sent once, at start."""

    loader: Callable[..., Any]
    worker_init: Callable[[int], Any] | None


class Load(NamedTuple):
    key: Any  # (epoch, batch), the parent's name for the batch
    ids: bytes  # the batch's sample ids, pickled on their own (`pack_ids`)
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


# -- what an executor reports to the engine (executor.py) ----------------------


@dataclasses.dataclass
class Outcome:
    """How one batch ended: its value, or the error that replaced it.

    Attributes:
        value: The batch, as the loader returned it (None on error).
        error: The exception that ends the batch instead, or None.
        seconds: Wall time of the loader call, in seconds (0 if unknown).
        pid: Process id of the worker that ran it (0 if none did).
    """

    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0
    pid: int = 0


class Arrived(NamedTuple):
    """Worker `worker_index` answered its load of `key` with `outcome`; it
    is idle again."""

    worker_index: int
    key: Any
    outcome: Outcome


class Lost(NamedTuple):
    """Worker `worker_index` is gone. If it held a load, `outcome` ends that
    load with an error (`WorkerDiedError`, `WorkerTimeoutError`), or is None:
    the load never started, send it again. Which load it held is the
    engine's to know (the schedule stores it), not the event's."""

    worker_index: int
    outcome: Outcome | None


class Joined(NamedTuple):
    """Worker `worker_index` is ready for its first load."""

    worker_index: int


Event = Arrived | Lost | Joined


# -- errors across the process boundary -----------------------------------------

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def pack_ids(ids: Any) -> bytes:
    """A batch's sample ids, pickled for a `Load`.

    Raises:
        BaseException: Whatever pickling `ids` raises (an id that holds a
            lock, a `__reduce__` that raises): the caller fails that batch.
    """
    return pickle.dumps(ids, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_ids(data: bytes) -> Any:
    """The sample ids `pack_ids` pickled; raises what unpickling raises."""
    return pickle.loads(data)


def encode_error(e: BaseException) -> ErrorPayload:
    """Describes `e`, of any class, for the parent; never raises.

    A `__str__`, `__repr__` or note that raises (any class) leaves a
    shorter description; an exception that does not survive a pickle round
    trip, even rebuilt from its state, travels as text only.
    """
    with deferred_interrupts():
        headline = _headline(e)
        try:
            summary = traceback.extract_tb(e.__traceback__)
        except BaseException:
            summary = traceback.StackSummary()
        own = [f for f in summary if not f.filename.startswith(_PACKAGE_DIR)]
        try:
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        except BaseException:  # a __str__, __repr__ or note that raises
            tb = "Traceback (most recent call last):\n" + "".join(summary.format())
            tb += headline + "\n"
        frames = "".join(traceback.format_list(own or summary)) + headline
        return ErrorPayload(_pickled(e), headline, tb, frames)


def decode_error(payload: ErrorPayload, where: str) -> BaseException:
    """Rebuilds the worker's exception for the caller; never raises.

    It keeps its type where it unpickles (else a `RuntimeError` with its
    description), its traceback text as `__cause__`, and a PEP 678 note with
    the loader's frames: notes survive Keras's traceback filtering, which
    re-raises `from None` and so drops the cause.

    Args:
        payload: What `encode_error` made in the worker.
        where: Which worker, for the note, e.g. `"worker 0 (pid 123)"`.

    Returns:
        The exception to raise: of the worker's class, or a `RuntimeError`
        naming it when it cannot be rebuilt in this process (unpickling it
        raised, of any class).
    """
    with deferred_interrupts():
        error: BaseException | None = None
        if payload.pickled is not None:
            try:
                loaded = pickle.loads(payload.pickled)
            except BaseException:
                loaded = None
            if isinstance(loaded, BaseException):
                error = loaded
        if error is None:
            error = RuntimeError(
                f"{payload.description} (keras_oom: the worker's exception "
                f"could not be rebuilt in this process; this RuntimeError "
                f"stands in for it)"
            )
        with contextlib.suppress(BaseException):  # a class that refuses it
            object.__setattr__(error, "__cause__", RemoteTraceback(payload.traceback))
        add_note(
            error,
            f"keras_oom: raised in {where}, traceback (most recent call last):\n"
            f"{payload.frames}",
        )
        return error


def _pickled(e: BaseException) -> bytes | None:
    """`e` pickled, if it also unpickles: by `pickle`, else from its state."""
    for candidate in (e, _ByState(e)):
        try:
            data = pickle.dumps(candidate)
            pickle.loads(data)  # it must also come back in the parent
        except BaseException:
            continue
        return data
    return None


class _ByState:
    """Pickles an exception as its class, `args` and attributes.

    `pickle` rebuilds an exception as `cls(*args)`, then sets its attributes
    with `setattr`: an `__init__` that takes other arguments, or a frozen
    dataclass's `__setattr__`, refuses. This rebuilds it as `copyreg` does
    for plain objects, calling neither.
    """

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        e = self.error
        return (_rebuild_exception, (type(e), e.args, dict(vars(e))))


def _rebuild_exception(
    cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]
) -> BaseException:
    error = cls.__new__(cls, *args)
    object.__setattr__(error, "args", args)
    for name, value in state.items():
        object.__setattr__(error, name, value)
    return error


def _headline(e: BaseException) -> str:
    try:
        name = f"{type(e).__module__}.{type(e).__qualname__}"
    except BaseException:
        name = "<exception>"
    return f"{name}: {safe_str(e)}"


def safe_str(e: BaseException) -> str:
    """`str(e)`, or a stand-in naming its class when that raises; never raises."""
    try:
        return str(e)
    except BaseException:
        return f"<{type(e).__name__}: str() failed>"


def describe_error(e: BaseException) -> str:
    """`"Type: message"` for a message of ours; never raises."""
    return f"{type(e).__name__}: {safe_str(e)}"


def add_note(exc: BaseException, note: str) -> bool:
    """Attaches `note` to `exc` (PEP 678), whatever `exc` allows; never raises.

    `exc.add_note` first. Where it refuses (a frozen dataclass's
    `__setattr__`, `__notes__` that is a tuple, a string or not a sequence)
    the notes are rebuilt as a list, keeping those already there, and set
    with `object.__setattr__`, which bypasses the class's own `__setattr__`.
    When nothing works, the note is dropped and `exc` is left as it was, so
    the caller still raises the user's own exception.

    Args:
        exc: The exception, of any class.
        note: The text to attach.

    Returns:
        Whether the note was attached.
    """
    with deferred_interrupts():
        try:
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(note)
                return True
        except BaseException:
            pass
        try:
            old = getattr(exc, "__notes__", None)
        except BaseException:
            old = None
        try:
            object.__setattr__(exc, "__notes__", [*_as_notes(old), note])
        except BaseException:
            return False
        return True


def _as_notes(notes: Any) -> list[Any]:
    if notes is None:
        return []
    if isinstance(notes, (list, tuple)):
        return list(notes)
    return [notes]  # a string, or anything else: one note, as traceback shows it


def describe_ids(ids: Any, limit: int = 3) -> str:
    """A short, printable preview of a batch's sample ids; never raises.

    An id whose `repr` raises (any class) shows as `<TypeName>`.
    """
    with deferred_interrupts():
        try:
            count = len(ids)
            shown = ", ".join(describe_id(ids[k]) for k in range(min(count, limit)))
        except BaseException:
            return f"<ids of type {type(ids).__name__}>"
        more = f", ... ({count} ids)" if count > limit else ""
        return f"[{shown}{more}]"


def describe_id(sample_id: Any) -> str:
    """One sample id as `describe_ids` shows it; never raises."""
    try:
        return repr(sample_id.item() if hasattr(sample_id, "item") else sample_id)
    except BaseException:
        return f"<{type(sample_id).__name__}>"


class deferred_interrupts:  # noqa: N801  (used as a function: `with deferred_interrupts():`)
    """Holds SIGINT back until the block ends, then delivers it.

    Python raises KeyboardInterrupt between any two bytecodes; inside a
    block that updates the pool and the schedule together, that would leave
    them disagreeing (a key marked sent but never sent, a descriptor left
    in a socket). Inside one, a KeyboardInterrupt can only come from code
    the block calls (a loader's exception being rebuilt, a `__repr__`), so
    the error paths here may catch every class without swallowing Ctrl-C.
    Only the main thread receives signals, so elsewhere this does nothing.

    A class, not a `contextlib.contextmanager`: an exception that leaves the
    block passes through untouched, whatever its class refuses (the
    generator form sets its `__traceback__`, which a frozen dataclass
    exception refuses, replacing it with `FrozenInstanceError`).
    """

    def __enter__(self) -> None:
        self._previous: Any = None
        self._received: list[Any] = []
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous is None or previous is signal.SIG_IGN:
            return
        self._previous = previous
        signal.signal(signal.SIGINT, lambda signum, frame: self._received.append(frame))

    def __exit__(self, *exc_info: object) -> None:
        previous = self._previous
        if previous is None:
            return
        signal.signal(signal.SIGINT, previous)
        if self._received:
            if callable(previous):
                previous(signal.SIGINT, self._received[0])
            else:  # SIG_DFL
                os.kill(os.getpid(), signal.SIGINT)
