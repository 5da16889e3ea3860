"""How failures travel between the parent and its workers (keras_oom/protocol.py).

No processes here: `encode_error` is what a worker does with an exception,
`decode_error` what the parent does with the result, and `add_note` /
`describe_ids` how both decorate it. The promise (issue 14, Kind C): none of
them raises, whatever the exception or the ids do, so the caller always gets
the user's own exception, or a clear stand-in naming it, never an error
raised while reporting another.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading

import _faults
import _procs
import numpy as np
import pytest

from keras_oom.protocol import (
    RemoteTraceback,
    add_note,
    decode_error,
    deferred_interrupts,
    describe_ids,
    encode_error,
    pack_ids,
    unpack_ids,
)

ALL_CLASSES = sorted(_faults.CLASSES)


def raised(error: BaseException) -> BaseException:
    """`error` with a traceback, as a loader's exception has one."""
    try:
        raise error
    except BaseException as e:
        return e


def round_trip(error: BaseException) -> BaseException:
    return decode_error(encode_error(raised(error)), "worker 0 (pid 1)")


# -- add_note ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FrozenNoteError(Exception):
    code: int = 0


class TupleNotesError(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.__notes__ = ("first", 2)


class RefusingAddNoteError(Exception):
    def add_note(self, note):
        raise KeyboardInterrupt("add_note refused")


class ReadOnlyNotesError(Exception):
    """`__notes__` a read-only property that raises: no note can be kept."""

    @property
    def __notes__(self):
        raise SystemExit("__notes__ cannot be read")

    def __setattr__(self, name, value):
        raise GeneratorExit("no attributes")


def test_add_note_attaches_to_a_frozen_dataclass_exception():
    """Kind C (item 5): `add_note` raised FrozenInstanceError instead of
    noting the user's exception."""
    error = FrozenNoteError(3)
    add_note(error, "keras_oom: a note")
    assert error.__notes__ == ["keras_oom: a note"]
    assert error.code == 3


def test_add_note_keeps_tuple_notes_and_their_non_strings():
    """Kind C (item 5): `__notes__` a tuple made `add_note` raise TypeError."""
    error = TupleNotesError("boom")
    add_note(error, "keras_oom: a note")
    assert error.__notes__ == ["first", 2, "keras_oom: a note"]


@pytest.mark.parametrize("notes", ["one string", 42, None])
def test_add_note_over_notes_that_are_not_a_sequence_of_notes(notes):
    """Kind C: `__notes__` a string or a non-sequence is kept as one note."""
    error = ValueError("boom")
    error.__notes__ = notes
    add_note(error, "keras_oom: a note")
    kept = [] if notes is None else [notes]
    assert error.__notes__ == [*kept, "keras_oom: a note"]


@pytest.mark.parametrize(
    "error",
    [RefusingAddNoteError("x"), ReadOnlyNotesError("y")],
    ids=["add_note-raises-KeyboardInterrupt", "read-only-notes"],
)
def test_add_note_never_raises_and_leaves_the_exception_usable(error):
    """Kind C: whatever refuses the note (any class), the caller still raises
    the user's own exception."""
    add_note(error, "keras_oom: a note")  # must not raise
    with pytest.raises(type(error)):
        raise error
    if isinstance(error, RefusingAddNoteError):  # object.__setattr__ still works
        assert error.__notes__ == ["keras_oom: a note"]


# -- describe_ids --------------------------------------------------------------------


class BadRepr:
    def __init__(self, exc):
        self.exc = exc

    def __repr__(self):
        raise self.exc


@pytest.mark.parametrize("exc", ALL_CLASSES)
def test_describe_ids_survives_a_repr_that_raises_any_class(exc):
    """Kind C: an id whose __repr__ raises (any class) replaced the loader's
    error with its own while the note naming the batch was written."""
    ids = np.empty(4, dtype=object)
    ids[:] = [1, BadRepr(_faults.make(exc, "repr")), 3, 4]
    text = describe_ids(ids)
    assert text.startswith("[1, <BadRepr>, 3, ...")
    assert "(4 ids)" in text


# -- encode_error / decode_error ------------------------------------------------


class BadStr(Exception):
    def __init__(self, exc):
        super().__init__(exc)
        self.exc = exc

    def __str__(self):
        raise _faults.make(self.exc, "__str__ failed")

    def __repr__(self):
        raise _faults.make(self.exc, "__repr__ failed")


class BadNote:
    def __init__(self, exc):
        self.exc = exc

    def __str__(self):
        raise _faults.make(self.exc, "str of a note failed")

    __repr__ = __str__


class ReduceRaises(Exception):
    def __init__(self, exc, hold=None):
        super().__init__(exc)
        self.exc = exc
        self.hold = hold

    def __reduce__(self):
        raise _faults.make(self.exc, "__reduce__ failed")


@pytest.mark.parametrize("exc", ALL_CLASSES)
def test_encode_error_never_raises_when_str_raises_any_class(exc):
    """Kind C: a loader exception whose __str__ / __repr__ raise a
    BaseException escaped `encode_error` and killed the worker."""
    payload = encode_error(raised(BadStr(exc)))
    assert "BadStr" in payload.description
    assert "BadStr" in payload.traceback
    error = decode_error(payload, "worker 0 (pid 1)")
    assert type(error) is BadStr  # it pickles: its own type comes back


@pytest.mark.parametrize("exc", ALL_CLASSES)
def test_encode_error_never_raises_when_a_note_cannot_be_printed(exc):
    """Kind C, a guard: a note whose str() raises any class (traceback
    already shows it as `<note str() failed>`; it must stay so)."""
    error = ValueError("boom")
    error.__notes__ = [BadNote(exc)]
    payload = encode_error(raised(error))
    assert "ValueError" in payload.description


@pytest.mark.parametrize("exc", ALL_CLASSES)
def test_an_exception_whose_reduce_raises_any_class_travels_by_its_state(exc):
    """Kind C: pickling the loader's exception raised (any class): it comes
    back rebuilt from its class, args and attributes, or, when those do not
    pickle either (it holds a lock), as a `RuntimeError` naming it."""
    back = round_trip(ReduceRaises(exc))
    assert type(back) is ReduceRaises
    assert back.exc == exc
    error = round_trip(ReduceRaises(exc, hold=threading.Lock()))
    assert type(error) is RuntimeError
    assert "test_protocol.ReduceRaises" in str(error)
    assert "could not be rebuilt" in str(error)
    assert isinstance(error.__cause__, RemoteTraceback)


@pytest.mark.parametrize("exc", ALL_CLASSES)
def test_every_class_comes_back_as_itself_with_notes(exc):
    """Kind C: `KeyboardInterrupt`, `SystemExit`, `GeneratorExit`, a custom
    `BaseException` and a frozen dataclass exception come back as
    themselves, with the worker's traceback as cause and a note saying where
    it was raised (so a loader's KeyboardInterrupt is not the parent's)."""
    error = round_trip(_faults.make(exc, "from the loader"))
    assert type(error) is _faults.CLASSES[exc]
    assert "from the loader" in str(error)
    assert isinstance(error.__cause__, RemoteTraceback)
    notes = error.__notes__
    assert any("raised in worker 0 (pid 1)" in n for n in notes), notes


def test_a_frozen_dataclass_exception_keeps_its_fields_and_notes():
    """Kind C (item 5): plain unpickling of a frozen dataclass exception
    raises FrozenInstanceError; it must come back as itself all the same."""
    error = FrozenNoteError(7)
    object.__setattr__(error, "__notes__", ("the loader's note",))
    back = round_trip(error)
    assert type(back) is FrozenNoteError
    assert back.code == 7
    assert back.__notes__[0] == "the loader's note"
    assert len(back.__notes__) == 2


def test_an_exception_whose_init_needs_other_arguments_comes_back_as_itself():
    """Kind C: `pickle` calls `cls(*args)`, which an `__init__` taking other
    arguments refuses; rebuilt from its state instead, it keeps its type."""

    back = round_trip(_procs.NeedsArgError(5, "extra"))
    assert type(back) is _procs.NeedsArgError
    assert back.extra == "extra"
    assert "needs-arg failure: 5" in str(back)


def _raise(exc):
    raise _faults.make(exc, "unpickling in the parent")


class RebuildRaises:
    def __init__(self, exc):
        self.exc = exc

    def __reduce__(self):
        return (_raise, (self.exc,))


@pytest.mark.parametrize("exc", ALL_CLASSES)
def test_an_exception_that_does_not_unpickle_in_the_parent_is_described(exc):
    """Kind C: unpickling the worker's exception in the parent raised (any
    class, `KeyboardInterrupt` included) out of `decode_error`."""
    payload = encode_error(raised(ValueError("the loader's")))
    payload = payload._replace(pickled=pickle.dumps(RebuildRaises(exc)))
    error = decode_error(payload, "worker 0 (pid 1)")
    assert type(error) is RuntimeError
    assert "builtins.ValueError: the loader's" in str(error)


def test_decode_error_sets_the_cause_of_an_exception_that_refuses_attributes():
    """Kind C: `error.__cause__ = ...` goes through a frozen `__setattr__`."""
    back = round_trip(FrozenNoteError(1))
    assert type(back) is FrozenNoteError
    assert isinstance(back.__cause__, RemoteTraceback)


# -- pack_ids ------------------------------------------------------------------------


def test_pack_ids_round_trips_and_raises_what_pickling_raises(tmp_path):
    ids = np.array(["a", "bb"])
    np.testing.assert_array_equal(unpack_ids(pack_ids(ids)), ids)
    token = str(tmp_path / "fired")
    fault = _faults.Fault("send-request", "KeyboardInterrupt", token, 0)
    faulty = np.empty(1, dtype=object)
    faulty[0] = _faults.FaultyId(1, fault)
    with pytest.raises(KeyboardInterrupt, match="does not pickle"):
        pack_ids(faulty)


def test_deferred_interrupts_lets_a_frozen_exception_leave_unchanged():
    """Kind C: an exception of a class that refuses attribute changes (a
    frozen dataclass) leaves a `deferred_interrupts` block as itself, not
    replaced by the `FrozenInstanceError` of a context manager that sets
    its `__traceback__`."""
    error = _faults.make("FrozenError", "raised in the block")
    with pytest.raises(type(error)) as info, deferred_interrupts():
        raise error
    assert info.value is error
