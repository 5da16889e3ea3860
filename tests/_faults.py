"""Faults of every exception class, at every step of a read (issue 14, Kind C).

Kept free of pytest and Keras imports: workers started as fresh interpreters
import this module to unpickle the loaders, sample ids, batches and
exceptions defined here.

A `Fault` fires once: the first process to claim its token file (created
with `O_EXCL`) raises, every later attempt in any process passes. So a test
sees the fault on its first read of the faulty batch, and the right batch on
the next read of it.

The faulty batch holds sample id `FAULTY_ID`. Steps, in the order a read
performs them:

    send-request     pickling the request in the parent: the id's __reduce__
    receive-request  unpickling the request in the worker: the id's rebuild
    loader           the loader itself
    send-reply       pickling the batch in the worker: the batch's __reduce__
    receive-reply    unpickling the batch in the parent: the batch's rebuild
    receive-error    unpickling the loader's exception in the parent
    decorate         the loader's exception refuses notes (`__notes__` is a
                     tuple holding a non-string; frozen dataclasses refuse
                     every attribute)
    sample-loader    `stack_samples`'s per-sample loader raises such an
                     exception
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import numpy as np

FAULTY_ID = 5  # batch 1 at batch size 4


class CustomError(Exception):
    """A plain user exception."""


class CustomBaseError(BaseException):
    """A user exception that is not an `Exception`."""


@dataclasses.dataclass(frozen=True)
class FrozenError(Exception):
    """A frozen dataclass exception: every attribute assignment raises
    `FrozenInstanceError`, `__notes__` (so `add_note`) and `__cause__`
    included, and plain unpickling fails (it sets `message` again)."""

    message: str = "frozen"


# Every class a read must survive: Exceptions, BaseExceptions that are not,
# and one that refuses notes.
CLASSES = {
    cls.__name__: cls
    for cls in (
        ValueError,
        CustomError,
        FrozenError,
        KeyboardInterrupt,
        SystemExit,
        GeneratorExit,
        CustomBaseError,
    )
}

PARENT_STEPS = ("send-request", "receive-reply", "receive-error")
WORKER_STEPS = ("receive-request", "send-reply")
LOADER_STEPS = ("loader", "decorate", "sample-loader")  # also LoaderDataset's
STEPS = (
    "send-request",
    "receive-request",
    "loader",
    "send-reply",
    "receive-reply",
    "receive-error",
    "decorate",
    "sample-loader",
)


class Fault(NamedTuple):
    step: str
    exc: str  # a name in CLASSES
    token: str  # the file whose creation fires the fault
    parent: int  # pid of the process that owns the dataset


def claim(token: str) -> bool:
    """True for the first caller, in any process; False afterwards."""
    try:
        os.close(os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def make(exc: str, text: str) -> BaseException:
    """An instance of class `exc`, with message `text`."""
    return CLASSES[exc](text)


def refusing_notes(exc: str, text: str) -> BaseException:
    """An instance of `exc` whose `__notes__` is a tuple holding a non-string,
    which `BaseException.add_note` refuses."""
    error = make(exc, text)
    object.__setattr__(error, "__notes__", ("a note of the loader's", 42))
    return error


def fires(fault: Fault | None, step: str) -> bool:
    return fault is not None and fault.step == step and claim(fault.token)


# -- sample ids ------------------------------------------------------------------


class FaultyId:
    """A sample id that can fail to pickle (in the parent) or to unpickle (in
    the worker)."""

    def __init__(self, value: int, fault: Fault | None) -> None:
        self.value = value
        self.fault = fault

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"FaultyId({self.value})"

    def __reduce__(self) -> Any:
        if fires(self.fault, "send-request"):
            raise make(self.fault.exc, f"id {self.value} does not pickle")
        return (_rebuild_id, (self.value, self.fault))


def _rebuild_id(value: int, fault: Fault | None) -> FaultyId:
    in_worker = fault is not None and os.getpid() != fault.parent
    if in_worker and fires(fault, "receive-request"):
        raise make(fault.exc, f"id {value} does not unpickle in the worker")
    return FaultyId(value, fault)


def sample_ids(n: int, fault: Fault | None) -> np.ndarray:
    """`n` ids, an object array whose id `FAULTY_ID` is a `FaultyId`."""
    ids = np.empty(n, dtype=object)
    ids[:] = list(range(n))
    ids[FAULTY_ID] = FaultyId(FAULTY_ID, fault)
    return ids


# -- batches -----------------------------------------------------------------------


class FaultyBatch:
    """A batch that can fail to pickle (in the worker) or to unpickle (in the
    parent)."""

    def __init__(self, x: np.ndarray, fault: Fault) -> None:
        self.x = x
        self.fault = fault

    def __reduce__(self) -> Any:
        if fires(self.fault, "send-reply"):
            raise make(self.fault.exc, "the batch does not pickle")
        return (_rebuild_batch, (self.x, self.fault))


def _rebuild_batch(x: np.ndarray, fault: Fault) -> FaultyBatch:
    if os.getpid() == fault.parent and fires(fault, "receive-reply"):
        raise make(fault.exc, "the batch does not unpickle in the parent")
    return FaultyBatch(x, fault)


def values(batch: Any) -> np.ndarray:
    """The array of a batch, whether or not it came as a `FaultyBatch`."""
    return batch.x if isinstance(batch, FaultyBatch) else batch


# -- exceptions that do not travel back -------------------------------------------


class UnrebuildableError(Exception):
    """Pickles and unpickles in the worker; its rebuild raises in the parent
    an exception of class `exc`."""

    def __init__(self, exc: str, parent: int) -> None:
        super().__init__(f"cannot be rebuilt in the parent ({exc})")
        self.exc = exc
        self.parent = parent

    def __reduce__(self) -> Any:
        return (_rebuild_unrebuildable, (self.exc, self.parent))


def _rebuild_unrebuildable(exc: str, parent: int) -> UnrebuildableError:
    if os.getpid() == parent:
        raise make(exc, "rebuilding UnrebuildableError")
    return UnrebuildableError(exc, parent)


# -- loaders -------------------------------------------------------------------------


def loader(ids: Any, fault: Fault | None) -> Any:
    """`ids * 2` as int64, misbehaving at `fault`'s step for the faulty batch."""
    x = np.array([int(i) for i in ids], dtype=np.int64) * 2
    if FAULTY_ID not in x // 2:
        return x
    if fires(fault, "loader"):
        raise make(fault.exc, "the loader failed")
    if fires(fault, "decorate"):
        raise refusing_notes(fault.exc, "the loader failed, refusing notes")
    if fires(fault, "receive-error"):
        raise UnrebuildableError(fault.exc, fault.parent)
    if fault is not None and fault.step in ("send-reply", "receive-reply"):
        return FaultyBatch(x, fault)
    return x


def sample_loader(sample_id: Any, fault: Fault | None) -> np.ndarray:
    """One sample for `stack_samples`: `2 * id`."""
    value = int(sample_id)
    if value == FAULTY_ID and fires(fault, "sample-loader"):
        raise refusing_notes(fault.exc, f"sample {value} failed, refusing notes")
    return np.int64(2 * value)


def object_ids_loader(ids: Any) -> np.ndarray:
    """Twice each integer id of an object array; -1 for any other id."""
    return np.array([i if isinstance(i, int) else -1 for i in ids]) * 2


def dying_mid_reply_loader(ids: Any, token: str) -> np.ndarray:
    """Loads a batch large enough for shared memory; the first time (in any
    process), the worker is SIGKILLed after the reply's header went out and
    before its descriptor follows, as a kill can land mid-send."""
    if claim(token):
        import signal

        from keras_oom import transport

        def die(*args: Any) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        transport._send_fd = die  # type: ignore[attr-defined]
    out = np.empty((len(ids), 64 * 1024), np.float32)  # 256 KiB a row
    out[:] = np.asarray(ids, np.float32)[:, None]
    return out
