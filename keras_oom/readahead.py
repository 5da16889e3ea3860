"""Caller-side read-ahead policy: re-reads of an epoch's first batches, and
reads out of order. Used by the engine (engine.py); no processes, no I/O.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import numpy as np

from keras_oom.schedule import Key


class ReReadCache:
    """Copies of an epoch's first batches, for a caller that reads them twice.

    TensorFlow's adapter reads batches 0 and 1 to infer shapes, then reads
    them again to train; JAX's trainer reads batch 0 before the epoch. This
    serves such a re-read of the same `(epoch, batch)` without loading it
    again. It holds at most `size` batches, all of one epoch, and forgets
    them once the caller reads past them or moves to another epoch.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._kept: dict[Key, Any] = {}
        self._frozen: set[Key] = set()  # kept as handed out: `_unchangeable`

    def get(self, key: Key) -> tuple[bool, Any]:
        """`(True, a copy of the value)` if `key` was kept, else `(False, None)`.

        (The value itself where the caller cannot change it: `_unchangeable`.)

        A value whose copy raises (any class) is forgotten: a miss, loaded
        again. Call it with SIGINT deferred, so that Ctrl-C is not taken
        for such a copy.
        """
        if key in self._kept:
            value = self._kept[key]
            if key in self._frozen:
                return True, value
            try:
                return True, copy.deepcopy(value)
            except BaseException:
                del self._kept[key]
        return False, None

    def seen(self, key: Key, value: Any) -> None:
        """Notes that `value`, batch `key`, was handed out.

        A copy of `value` is kept if it is one of the epoch's first `size`
        batches (a copy: the caller may change the batch in place); reading
        any other batch lets every kept one go. A value whose copy raises
        (any class) is not kept; call it with SIGINT deferred, as `get`.
        """
        if key[1] >= self.size or any(k[0] != key[0] for k in self._kept):
            self.clear()
        if key[1] < self.size:
            if _unchangeable(value):  # no copy: the caller cannot change it
                self._kept[key] = value
                self._frozen.add(key)
                return
            self._frozen.discard(key)
            # A copy even of shared-memory batches: `_unchangeable` says why.
            with contextlib.suppress(BaseException):  # it cannot be copied
                self._kept[key] = copy.deepcopy(value)

    def clear(self) -> None:
        self._kept.clear()
        self._frozen.clear()

    def __len__(self) -> int:
        return len(self._kept)


def _unchangeable(value: Any) -> bool:
    """Whether no holder of `value` can change it in place.

    True for immutable scalars and strings, tuples of such values, and NumPy
    arrays that are read-only all the way down to a read-only buffer (the
    Ray executor's batches: views of the object store). Not for a read-only
    array that owns its data or views a writable one: its owner may turn
    writing back on, or write through the base. Such values are kept as
    they are.

    The local pool's batches are writable views of a worker's shared
    memory, so they are copied: two copies of each of an epoch's first
    batches. Keeping them without a copy (issue 16) was measured and
    rejected. The caller writes into the very buffer the cache would keep,
    so the first hand-out too would have to be a copy-on-write
    (`MAP_PRIVATE`) mapping of the file, and the re-read another; but the
    parent keeps no descriptor of a buffer once mapped (shm.py: held
    batches would cost one each, against `RLIMIT_NOFILE`), and a private
    mapping kept per buffer would show the caller's old pages in the next
    batch recycled into it. It would not be faster either (12 MiB batch,
    medians of 300 interleaved runs): a fresh mapping costs in page faults
    what the copy costs (reading all of it 1.46 ms, private, against 0.60
    ms for the pool's mapping already faulted in; the deep copy 0.72 ms),
    and a caller that augments in place pays a fault and a page copy per
    4 KiB (10.9 ms against 0.41 ms in a shared mapping, 26x).
    """
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return True
    if isinstance(value, np.generic):
        return value.dtype != object
    if isinstance(value, tuple):
        return all(_unchangeable(v) for v in value)
    if not isinstance(value, np.ndarray) or value.dtype.hasobject:
        return False
    base: Any = value
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return False
        base = base.base
    if base is None:  # owns its data: the flag can be turned back on
        return False
    try:
        with memoryview(base) as view:
            return view.readonly
    except TypeError:
        return False


class OrderWatch:
    """Tells when the caller reads batches out of order, defeating prefetch.

    One jump (a peek at `ds[5]`) is fine; `after` out-of-order reads in one
    epoch are a shuffled batch order (Keras's `fit(shuffle=True)`).
    """

    def __init__(self, after: int = 2) -> None:
        self.after = after
        self._last: Key | None = None
        self._count = (0, 0)  # (epoch, out-of-order reads in it)
        self.warned = False

    def note(self, key: Key, expected_next: Key | None) -> bool:
        """Records a read of `key`; True once, when the warning is due.

        Args:
            key: The key read now.
            expected_next: The key that follows the previous read.
        """
        last, self._last = self._last, key
        if last is None or key in (last, expected_next) or key[1] == 0:
            return False
        epoch, count = self._count
        count = count + 1 if epoch == key[0] else 1
        self._count = (key[0], count)
        if count >= self.after and not self.warned:
            self.warned = True
            return True
        return False

    @property
    def last(self) -> Key | None:
        return self._last
