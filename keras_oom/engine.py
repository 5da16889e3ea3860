"""The engine behind `PrefetchLoaderDataset`: one read, from `ds[i]` to a
worker and back.

`Prefetcher` joins the `Schedule` (which worker loads which key: the one
place that knows), an executor (whatever runs the workers: executor.py), a
re-read cache and an order watch (readahead.py). It knows nothing of Keras;
a test drives it with a fake executor (tests/test_schedule.py).

One batch, going one way:

    ds[i] (prefetch.py)
      | index -> key (epoch, batch); returns what get() gives, or raises
      v
    Prefetcher.get(key)
      | re-read cache: batch 0 or 1 read again? a copy, done
      | schedule.request(key): key is wanted; the window follows it
      | _dispatch(): schedule.assign() -> (worker_index, key) for each
      |   idle worker; make the Load (ids pickled, seed, state changes)
      v
    executor.submit(worker_index, Load)  --->  worker: loader(ids[, rng])
                                                  (process_pool.py, worker.py)
    executor.wait(); take_events()       <---  Arrived(worker_index, key, Outcome)
      | _apply(): each event to the schedule  (or Lost / Joined)
      |   (arrived: kept if wanted or in the window, else discarded)
      | schedule.take(key) -> Outcome; _dispatch() the next keys
      v
    ds[i] <- Outcome (value, or error raised with the batch named)

Every state change runs with SIGINT deferred (`deferred_interrupts`), so a
Ctrl-C lands only between consistent states: events taken from the executor
wait in `_pending` until applied, one at a time, and an event applied is
gone from there. A blocking `executor.wait()` is the one place a Ctrl-C
lands directly; what it read stays in the executor for the next call.

Loader state changed between epochs (state.py): `discard_loaded()` marks
every request in flight stale (`(worker_index, key)`), whose batches are
dropped on arrival and loaded again with the new state.
"""

from __future__ import annotations

import collections
import time
import warnings
from collections.abc import Callable
from typing import Any, Protocol

from keras_oom.executor import Executor
from keras_oom.protocol import (
    Arrived,
    Event,
    Joined,
    Load,
    Lost,
    Outcome,
    WorkerSetup,
    add_note,
    deferred_interrupts,
    pack_ids,
)
from keras_oom.readahead import OrderWatch, ReReadCache
from keras_oom.schedule import Key, Schedule
from keras_oom.state import Update, position_moved
from keras_oom.stats import ReadStats


class Source(Protocol):
    """What the engine needs to make a batch's request (source.BatchSource)."""

    def ids(self, epoch: int, batch: int) -> Any: ...

    def seed_of(self, epoch: int, batch: int) -> tuple[int, int, int]: ...


class StateHook(Protocol):
    """Loader state sent to workers (state.StateTracker)."""

    def refresh(self) -> bool: ...

    def joined(self, worker_index: int) -> None: ...

    def updates_for(self, worker_index: int) -> tuple[Update, ...]: ...


class Prefetcher:
    """Loads batches ahead through an executor, in the order they are read.

    Not thread-safe: the caller serialises calls (the dataset's lock),
    except `close()`, which may come from any thread.

    Args:
        executor: An unstarted executor (executor.py).
        source: Gives each key's sample ids and seed.
        num_workers: Workers to start; times the executor's
            `loads_per_worker` (1 if it has none), the worker indexes to
            keep busy and the read-ahead window.
        batches_per_epoch: Keys `(e, batches_per_epoch - 1)` are followed by
            `(e + 1, 0)`.
        reads: Where reads are counted, for `stats()`.
        state: Loader state for workers, or None.
        position_state: Extra state a request for a key carries (a
            subclass's `load` reading `self.epoch`), or None.
    """

    def __init__(
        self,
        executor: Executor,
        source: Source,
        *,
        num_workers: int,
        batches_per_epoch: int,
        reads: ReadStats,
        state: StateHook | None = None,
        position_state: Callable[[Key], tuple[Update, ...]] | None = None,
    ) -> None:
        self.executor = executor
        # An executor with several loads in flight per worker (a Ray actor's
        # `in_flight`) exposes that many worker indexes per worker: the
        # window covers them all, or some would idle (executor.py).
        per_worker = getattr(executor, "loads_per_worker", 1)
        self.schedule = Schedule(num_workers * per_worker, batches_per_epoch)
        self._source = source
        self._num_workers = num_workers
        self._reads = reads
        self._state = state
        self._position_state = position_state
        # Events taken from the executor and not yet applied to the schedule.
        self._pending: collections.deque[Event] = collections.deque()
        self.cache = ReReadCache()
        self._order = OrderWatch()
        # Requests sent before a state change, as (worker_index, key): their
        # batches must not be served.
        self._stale: set[tuple[int, Key]] = set()
        self._stale_discarded = 0
        # An epoch boundary passed: loader state may have changed since. The
        # workers start before the first read (`with`, `set_epoch`, ...) with
        # the state of that moment: the first read is such a boundary too.
        self._state_due = True

    def start(
        self, setup: WorkerSetup, *, timeout: float | None, epoch: int, start: int
    ) -> None:
        """Starts the executor's workers and loads ahead from `(epoch, start)`.

        Raises what the executor's start raises; it is closed then.
        """
        # Deferred: a Ctrl-C here must leave either no workers or workers
        # that the caller owns and will close.
        with deferred_interrupts():
            self.executor.start(setup, self._num_workers, timeout=timeout)
            self._apply(self.executor.take_events())
        self.restart(epoch, start)

    # -- the caller's side ----------------------------------------------------

    def get(self, key: Key) -> Outcome:
        """The outcome of batch `key`: waits for it, submitting it if needed.

        Raises:
            DatasetClosedError: If the executor was closed meanwhile.
            WorkerStartError: (or what broke the executor) If it broke.
            KeyboardInterrupt: At a Ctrl-C while waiting; the next call
                goes on from a consistent state.
        """
        with deferred_interrupts():  # a copy that raises is a miss
            hit, value = self.cache.get(key)
        start = time.perf_counter()
        if hit:
            outcome = Outcome(value=value)
            self._reads.hit()
        else:
            self._note_order(key)
            outcome = self._fetch(key)
            if outcome.error is None:
                with deferred_interrupts():  # one that cannot be copied
                    self.cache.seen(key, outcome.value)
        wait = time.perf_counter() - start
        self._reads.delivered(wait, outcome.seconds, self.executor)
        return outcome

    def restart(self, epoch: int, start: int = 0) -> None:
        """Loads ahead from batch `start` of `epoch`, what index 0 reads now."""
        with deferred_interrupts():
            self.schedule.restart(epoch)
            if start:
                # The window follows the last request: make it index 0.
                self.schedule.request((epoch, start))
            self._dispatch()

    def move(self, epoch: int, start: int, *, start_before: int, repeat: bool) -> None:
        """Index 0 reads batch `start` of `epoch` now: loads ahead from there.

        What was loaded ahead with position state that is wrong now
        (`state.position_moved`) is dropped and loaded again.
        """
        carries_position = self._position_state is not None
        if carries_position and position_moved(start_before, start, repeat):
            self.discard_loaded(epoch, start)
        else:
            self.restart(epoch, start)

    def state_may_change(self) -> None:
        """An epoch boundary: `check_state` looks again at the next read."""
        self._state_due = True

    def check_state(self, epoch: int, start: int) -> None:
        """At the first read after an epoch boundary: did loader state change?

        If so, every batch loaded or loading with the old state is dropped
        (`discard_loaded`), and each worker's next request carries what
        changed.

        Raises:
            TypeError: If a change cannot be pickled to reach the workers.
        """
        if not self._state_due or self._state is None:
            return
        changed = self._state.refresh()  # raises if a change cannot travel
        self._state_due = False
        if changed:
            self.discard_loaded(epoch, start)

    def discard_loaded(self, epoch: int, start: int) -> None:
        """Drops every batch loaded ahead and those still loading (loader
        state changed), then loads ahead from `(epoch, start)` again."""
        self._stale.update(self.schedule.held().items())
        self.schedule.restart(-1)  # a window of no real batch: all arrived go
        self.cache.clear()
        self.restart(epoch, start)

    @property
    def discarded(self) -> int:
        """Batches loaded and never handed out."""
        return self.schedule.discarded + self._stale_discarded

    def close(self) -> None:
        """Ends the executor's workers; idempotent, from any thread."""
        self.executor.close()

    def forget(self) -> None:
        """Lets go of what was loaded; after `close()`, by the owner."""
        self._pending.clear()
        self.cache.clear()

    # -- the glue -------------------------------------------------------------

    def _fetch(self, key: Key) -> Outcome:
        executor, schedule = self.executor, self.schedule
        with deferred_interrupts():
            executor.wait(0)  # what arrived meanwhile frees workers
            self._apply(executor.take_events())
            schedule.request(key)
            self._dispatch()
        done, outcome = schedule.take(key)
        if done:
            self._reads.hit()
        while not done:
            if not executor.expecting():
                # The schedule waits for a batch no worker holds: a bug,
                # which must fail loudly rather than spin.
                raise RuntimeError(
                    f"keras_oom internal error: batch {key} is wanted but no "
                    f"worker is loading it (held: {schedule.held()}). Please "
                    f"report this."
                )
            executor.wait()  # a Ctrl-C here leaves what it read there
            with deferred_interrupts():
                self._dispatch()
            done, outcome = schedule.take(key)
        with deferred_interrupts():
            self._dispatch()  # the worker it came from starts on the next one
        return outcome

    def _apply(self, events: list[Event]) -> None:
        """Applies `events` to the schedule, after any still pending.

        Each event leaves the queue just as it is applied, so an exception
        between two of them (none is expected: this runs with SIGINT
        deferred) leaves the rest for the next call instead of losing them.
        """
        pending = self._pending
        pending.extend(events)
        while pending:
            self._apply_one(pending.popleft())

    def _apply_one(self, event: Event) -> None:
        schedule = self.schedule
        index = event.worker_index
        if isinstance(event, Joined):
            schedule.add_worker(index)
            if self._state is not None:
                self._state.joined(index)
        elif isinstance(event, Arrived):
            key = schedule.arrived(index, event.outcome)
            assert key == event.key, (key, event.key)
            if (index, key) in self._stale:
                self._stale.discard((index, key))
                self._drop(key)
        elif isinstance(event, Lost):
            lost = schedule.lost(index, event.outcome)
            if lost is not None and (index, lost) in self._stale:
                self._stale.discard((index, lost))
                if event.outcome is not None:
                    self._drop(lost)

    def _dispatch(self) -> None:
        """Sends idle workers the keys the schedule assigns them.

        What the executor reported is applied first, so that the schedule
        only assigns workers that the executor has idle. A request that
        cannot be made (its ids do not pickle: an exception of any class)
        fails its batch: that exception becomes the batch's outcome, raised
        when it is read, and the worker, still idle, is given the next key.
        """
        self._apply(self.executor.take_events())
        schedule = self.schedule
        assignments = schedule.assign()
        while assignments:
            worker_index, key = assignments.pop(0)
            try:
                ids = pack_ids(self._source.ids(*key))
                seed = self._source.seed_of(*key)
            except BaseException as e:  # SIGINT is deferred: e is the ids'
                add_note(
                    e, "keras_oom: its sample ids could not be pickled for a worker"
                )
                schedule.arrived(worker_index, Outcome(error=e))
                assignments += schedule.assign()
                continue
            # After the ids pickled: the updates count as sent from here.
            updates: tuple[Update, ...] = ()
            if self._state is not None:
                updates = self._state.updates_for(worker_index)
            if self._position_state is not None:
                updates += self._position_state(key)
            self.executor.submit(worker_index, Load(key, ids, [], seed, updates))

    def _drop(self, key: Key) -> None:
        """Forgets the batch `key` that arrived from a stale request."""
        schedule = self.schedule
        wanted = schedule.wanted == key
        done, _ = schedule.take(key)
        if done:
            self._stale_discarded += 1
        if wanted:
            schedule.request(key)  # load it again, with the new state

    def _note_order(self, key: Key) -> None:
        last = self._order.last
        expected = None
        if last is not None:
            expected = (last[0], last[1] + 1)
            if expected[1] == self.schedule.batches_per_epoch:
                expected = (last[0] + 1, 0)
        self._reads.note_order(key, last, expected)
        if self._order.note(key, expected):
            warnings.warn(
                f"PrefetchLoaderDataset: batches are requested out of order "
                f"(batch {key[1]} after batch {last[1] if last else None}), so "
                f"its workers load batches that are not used next. Keras's "
                f"fit() shuffles the batch order by default: call "
                f"fit(..., shuffle=False) and build the dataset with "
                f"shuffle=True (it shuffles samples, a better shuffle), or use "
                f"repeat=True with steps_per_epoch=ds.batches_per_epoch.",
                UserWarning,
                stacklevel=5,
            )
