"""Loader state that changes between epochs, and how it reaches the workers.

`LoaderDataset` calls its loader in the caller's process, so a change to
the loader's state (a curriculum's `self.level += 1` in `on_epoch_end`, an
attribute of a loader object, a closure variable) shows in the next batch.
`PrefetchLoaderDataset`'s workers hold copies made when they started. This
module carries such changes to them:

- *State* is what the parent can see change and a worker can set: the
  instance attributes of the loader's object (a dataset subclass's own
  attributes, a callable loader object's, a bound method's `__self__`'s),
  or the closure variables of a loader function. Each is a *slot*:
  `("attr", name)` or `("cell", index)`.
- `StateTracker` (parent) fingerprints every slot when the workers start
  and again at the first read after each epoch boundary (`refresh`), never
  per batch. The first read is such a boundary too: the workers may start
  before it (`with`, `set_epoch`), and the state at that read counts. A
  fingerprint hashes the slot's pickled bytes (large arrays out of band,
  without a copy); a memory map is named by its file, not read; a value
  that does not pickle is known by its identity.
- Each worker's request (`protocol.Load.state`) carries the slots whose
  fingerprint differs from what that worker has (`updates_for`), pickled
  with `cloudpickle`; `apply_state` (worker) sets them on its copy before
  loading. A replacement worker starts from the state the pool started
  with, and gets everything that changed since.
- A changed slot that cannot be pickled cannot reach the workers: `refresh`
  raises a `TypeError` naming it, rather than let workers load stale data.

Not covered, and documented: module globals and state reached only through
other objects' internals (a loader calling a helper that reads a global),
and changes made in the middle of an epoch.

This module runs in workers too: it imports neither Keras nor a backend.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import pickle
import types
from collections.abc import Hashable
from typing import Any

import numpy as np

Slot = tuple[str, Hashable]  # ("attr", name) or ("cell", index)
Update = tuple[Slot, "bytes | None"]  # None: delete the attribute


def state_of(obj: Any, exclude: frozenset[str] = frozenset()) -> dict[Slot, Any]:
    """The slots of `obj`'s state and their current values.

    Args:
        obj: A loader (function, bound method, callable object) or a dataset
            whose `load` is overridden.
        exclude: Attribute names that are not state (a dataset's own
            machinery).

    Returns:
        `{slot: value}`; empty for objects without state this module can
        set (classes, modules, builtins, `functools.partial`).
    """
    if inspect.ismethod(obj):
        obj = obj.__self__
    if isinstance(obj, types.FunctionType):
        out: dict[Slot, Any] = {}
        for i, cell in enumerate(obj.__closure__ or ()):
            try:
                out[("cell", i)] = cell.cell_contents
            except ValueError:  # an empty cell: a variable not yet assigned
                continue
        return out
    if isinstance(
        obj,
        type | types.ModuleType | types.BuiltinFunctionType | functools.partial,
    ):
        return {}
    attrs = getattr(obj, "__dict__", None)
    if not isinstance(attrs, dict):
        return {}
    return {("attr", k): v for k, v in attrs.items() if k not in exclude}


def fingerprint(value: Any) -> tuple:
    """A value that changes when `value`'s pickled form changes.

    Large contiguous arrays are hashed in place (pickle protocol 5, out of
    band), not copied. A `numpy.memmap` is named by its file, offset,
    shape and dtype: its data lives in the file, where forked workers see
    it, and reading it all at every epoch would defeat its purpose.
    """
    if isinstance(value, np.memmap):
        return (
            "memmap",
            getattr(value, "filename", None),
            getattr(value, "offset", None),
            value.shape,
            str(value.dtype),
        )
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception:
        try:
            import cloudpickle

            data, buffers = cloudpickle.dumps(value), []
        except Exception:
            return ("identity", id(value))
    digest = hashlib.blake2b(data, digest_size=16)
    for buffer in buffers:
        digest.update(buffer.raw())
    return ("pickled", digest.digest())


class StateTracker:
    """What each worker's copy of the loader's state is, and what changed.

    Args:
        target: What `state_of` reads: the loader, or the dataset whose
            `load` workers run.
        exclude: Attribute names of `target` that are not state.
        owner: How to name `target` in errors, e.g. `"Curriculum"`.
    """

    def __init__(
        self, target: Any, exclude: frozenset[str] = frozenset(), owner: str = ""
    ) -> None:
        self._target = target
        self._exclude = exclude
        if owner is None:
            owner = getattr(target, "__qualname__", None) or type(target).__name__
        self._owner = owner
        self._baseline = self._fingerprints(state_of(target, exclude))
        self._current = self._baseline
        self._payloads: dict[Slot, tuple[tuple, bytes]] = {}
        self._known: dict[int, dict[Slot, tuple]] = {}

    def joined(self, worker_index: int) -> None:
        """A new worker started, with the state the pool started with."""
        self._known[worker_index] = self._baseline

    def refresh(self) -> bool:
        """Reads the state again; True if it changed since the last read.

        Raises:
            TypeError: If a slot changed and cannot be pickled, naming it.
        """
        values = state_of(self._target, self._exclude)
        current = self._fingerprints(values)
        if current == self._current:
            return False
        import cloudpickle

        payloads = {}
        for slot, fp in current.items():
            if self._current.get(slot) == fp or (
                slot in self._payloads and self._payloads[slot][0] == fp
            ):
                continue
            try:
                payloads[slot] = (fp, cloudpickle.dumps(values[slot]))
            except Exception as e:
                raise TypeError(
                    f"{self._describe(slot)} changed since the workers started "
                    f"and must reach them before they load more batches, but "
                    f"it cannot be pickled ({type(e).__name__}: {e}). Keep "
                    f"such objects out of the loader's state: create them in "
                    f"each worker (`worker_init`, or lazily in the loader), "
                    f"or change only picklable attributes between epochs."
                ) from e
        self._payloads.update(payloads)
        self._current = current
        return True

    def updates_for(self, worker_index: int) -> tuple[Update, ...]:
        """What worker `worker_index` lacks of the current state; it then has it all."""
        known = self._known.get(worker_index, self._baseline)
        if known is self._current:
            return ()
        out: list[Update] = []
        for slot, fp in self._current.items():
            if known.get(slot) != fp:
                out.append((slot, self._payloads[slot][1]))
        out += [(slot, None) for slot in known.keys() - self._current.keys()]
        self._known[worker_index] = self._current
        return tuple(out)

    @staticmethod
    def _fingerprints(values: dict[Slot, Any]) -> dict[Slot, tuple]:
        return {slot: fingerprint(v) for slot, v in values.items()}

    def _describe(self, slot: Slot) -> str:
        kind, name = slot
        if kind == "attr":
            return f"The attribute `{self._owner}.{name}`"
        target = self._target
        names = getattr(getattr(target, "__code__", None), "co_freevars", ())
        var = names[name] if isinstance(name, int) and name < len(names) else name
        return f"The closure variable `{var}` of the loader {self._owner}"


def tracker_for(
    loader: Any, dataset: Any = None, internal: frozenset[str] = frozenset()
) -> StateTracker:
    """Tracks what workers run: `dataset`'s attributes but its `internal`
    ones, when given (a subclass overriding `load`), else `loader`'s state."""
    if dataset is not None:
        return StateTracker(dataset, internal, type(dataset).__name__)
    return StateTracker(loader)


def apply_state(loader: Any, updates: tuple[Update, ...]) -> None:
    """Sets `updates` on a worker's loader, before it loads a batch."""
    target: Any = loader.__self__ if inspect.ismethod(loader) else loader
    for (kind, name), payload in updates:
        if kind == "cell":
            assert isinstance(name, int) and payload is not None
            target.__closure__[name].cell_contents = pickle.loads(payload)
        elif payload is None:
            assert isinstance(name, str)
            if name in vars(target):
                delattr(target, name)
        else:
            assert isinstance(name, str)
            setattr(target, name, pickle.loads(payload))


def position_updates(
    key: tuple[int, int], epoch: int, start: int, repeat: bool
) -> tuple[Update, ...]:
    """`_epoch` and `_start` as a dataset will have them when `key` is read.

    A subclass's `load` may read `self.epoch`; a worker loads batches ahead,
    so each request carries the values of the moment its batch is read.

    Args:
        key: `(epoch, batch)` of the batch requested.
        epoch, start: The dataset's `_epoch` and `_start` now.
        repeat: Whether the dataset repeats (then `epoch` does not follow
            the key: one Keras epoch spans passes).
    """
    if not repeat:
        epoch = key[0] - (1 if key[1] < start else 0)
    return (
        (("attr", "_epoch"), pickle.dumps(epoch)),
        (("attr", "_start"), pickle.dumps(start)),
    )


def position_moved(start_before: int, start: int, repeat: bool) -> bool:
    """Whether batches requested before a dataset moved (`set_epoch`, a new
    epoch) carry `position_updates` that are wrong now.

    Args:
        start_before, start: The dataset's `_start` before and after.
        repeat: Whether the dataset repeats: then its `_epoch` is sent as it
            is, and any move may have changed it.
    """
    return repeat or start != start_before
