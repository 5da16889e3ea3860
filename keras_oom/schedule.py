"""Which batch each worker loads next: the prefetcher's state machine.

No processes and no I/O live here, so the whole state can be driven and
checked directly (tests/test_schedule.py runs it, inside the real engine,
as a Hypothesis state machine). The engine (`engine.Prefetcher`) feeds it
what happens and carries out what it decides through the executor. It is
the one place that knows which worker holds which key.

A batch is named by its key `(epoch, batch)`. Each key is in at most one of
these states at a time:

    (untracked) --assign--> SUBMITTED to worker i --arrived--> ARRIVED
          ^                        |                              |
          |                     lost (the worker died, its        | take
          |                     error arrives instead; or the     v
          +----- requeue ------ message never came)           HANDED OUT
                                                               (untracked)
    ARRIVED --(outside the window)--> DISCARDED (untracked, counted)

The caller asks for one key at a time (`request`), which becomes the
*wanted* key and the *anchor* of the read-ahead window: the `window` keys
that follow it in epoch order (across the epoch's end). Idle workers are
given the wanted key first, then the window's keys in order.

Invariants, checked by `check()` after every step of the stateful test:

- every busy worker holds exactly one key, and no key is held by two;
- no key is both held by a worker and arrived;
- every arrived key is the wanted key or in the window, so at most
  `window + 1` loaded batches wait in memory;
- workers are either idle or busy, never both;
- while a key is wanted and has not arrived, it is held by a worker, or
  no worker is idle (so the caller always waits for something that comes),
  once the caller has called `assign()` after the events it applied.
"""

from __future__ import annotations

from typing import Any

Key = tuple[int, int]  # (epoch, batch within the epoch)


class Schedule:
    """Tracks batch keys through submitted, arrived and handed out.

    Args:
        window: How many keys after the last requested one to load ahead.
        batches_per_epoch: Keys `(e, batches_per_epoch - 1)` are followed by
            `(e + 1, 0)`.
    """

    def __init__(self, window: int, batches_per_epoch: int) -> None:
        self.window = window
        self.batches_per_epoch = batches_per_epoch
        # Keyed by worker_index (the number `worker_init` receives).
        self._idle: dict[int, None] = {}  # ordered set
        self._busy: dict[int, Key] = {}
        self._arrived: dict[Key, Any] = {}
        self._anchor: Key | None = None
        self._wanted: Key | None = None
        self.discarded = 0

    # -- workers -------------------------------------------------------------

    def add_worker(self, worker_index: int) -> None:
        """Worker `worker_index` is ready for requests."""
        assert worker_index not in self._idle and worker_index not in self._busy
        self._idle[worker_index] = None

    def lost(self, worker_index: int, outcome: Any = None) -> Key | None:
        """Worker `worker_index` is gone; returns the key it held, if any.

        With an `outcome` (the error that ends its batch), that key arrives
        with it; without one, the key goes back to untracked, to be
        assigned again (the batch was interrupted, not failed).
        """
        self._idle.pop(worker_index, None)
        key = self._busy.pop(worker_index, None)
        if key is not None and outcome is not None:
            self._settle(key, outcome)
        return key

    @property
    def workers(self) -> int:
        return len(self._idle) + len(self._busy)

    # -- the caller's side ---------------------------------------------------

    def request(self, key: Key) -> None:
        """The caller now wants `key`; the window moves to follow it."""
        self._wanted = key
        self._anchor = key
        self._discard_outside()

    def restart(self, epoch: int) -> None:
        """The caller moved to `epoch` (e.g. `set_epoch`): load from its start."""
        self._wanted = None
        self._anchor = (epoch, -1)
        self._discard_outside()

    def take(self, key: Key) -> tuple[bool, Any]:
        """`(True, outcome)` if `key` has arrived (it is handed out), else
        `(False, None)`."""
        if key not in self._arrived:
            return False, None
        if self._wanted == key:
            self._wanted = None
        return True, self._arrived.pop(key)

    def assign(self) -> list[tuple[int, Key]]:
        """Gives idle workers the wanted key, then the window's, in order.

        Returns:
            `(worker_index, key)` pairs, each now submitted; the caller must send
            each request, or report the worker `lost`.
        """
        targets = [] if self._wanted is None else [self._wanted]
        targets += self._window_keys()
        held = set(self._busy.values())
        out = []
        for key in targets:
            if not self._idle:
                break
            if key in held or key in self._arrived:
                continue
            worker_index = next(iter(self._idle))
            del self._idle[worker_index]
            self._busy[worker_index] = key
            held.add(key)
            out.append((worker_index, key))
        return out

    def arrived(self, worker_index: int, outcome: Any) -> Key:
        """Worker `worker_index` finished its key with `outcome` (a batch or
        an error)."""
        key = self._busy.pop(worker_index)
        self._idle[worker_index] = None
        self._settle(key, outcome)
        return key

    # -- introspection -------------------------------------------------------

    def held(self) -> dict[int, Key]:
        """The key each busy worker holds, by `worker_index`."""
        return dict(self._busy)

    def idle(self) -> list[int]:
        return list(self._idle)

    def arrived_keys(self) -> list[Key]:
        return list(self._arrived)

    @property
    def wanted(self) -> Key | None:
        return self._wanted

    def window_keys(self) -> list[Key]:
        return self._window_keys()

    def check(self, assigned: bool = True) -> None:
        """Asserts the invariants in the module docstring.

        Args:
            assigned: False if workers may have become idle since the last
                `assign()` (the caller is between applying events and
                assigning): the wanted key may then wait for that call.
        """
        held = list(self._busy.values())
        assert len(held) == len(set(held)), "a key is held by two workers"
        assert not set(held) & set(self._arrived), "a key is held and arrived"
        allowed = set(self._window_keys()) | {self._wanted}
        assert set(self._arrived) <= allowed, "an arrived key outside the window"
        assert len(self._arrived) <= self.window + 1
        assert not set(self._idle) & set(self._busy), "a worker idle and busy"
        wanted = self._wanted
        if assigned and wanted is not None and wanted not in self._arrived:
            assert wanted in held or not self._idle, "the wanted key is stranded"

    # -- internals -----------------------------------------------------------

    def _settle(self, key: Key, outcome: Any) -> None:
        if key == self._wanted or key in self._window_keys():
            self._arrived[key] = outcome
        else:
            self.discarded += 1

    def _discard_outside(self) -> None:
        allowed = set(self._window_keys())
        if self._wanted is not None:
            allowed.add(self._wanted)
        for key in [k for k in self._arrived if k not in allowed]:
            del self._arrived[key]
            self.discarded += 1

    def _window_keys(self) -> list[Key]:
        if self._anchor is None:
            return []
        epoch, batch = self._anchor
        keys = []
        for _ in range(self.window):
            batch += 1
            if batch >= self.batches_per_epoch:
                epoch, batch = epoch + 1, 0
            keys.append((epoch, batch))
        return keys
