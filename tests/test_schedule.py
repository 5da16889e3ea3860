"""The prefetcher's state machine (keras_oom/schedule.py), without processes.

`ScheduleMachine` drives a `Schedule` exactly as `PrefetchLoaderDataset`
does (`_fetch`, `_apply`, `_dispatch`, `_restart_window`), through a
simulated pool: a dict of live slots (slot -> key in flight, or None when
idle) and vacant slots waiting to restart. Like the real `WorkerPool`, the
simulated one changes only inside `wait()`, whose events are applied at
once, then idle workers are given work. Hypothesis picks what each wait
reports: batches arriving (values or loader errors), workers dying busy or
idle, replies that never come (the key is sent again), restarts that fail
for a while; and what the caller does: read a key (mostly the next one,
sometimes the same or a random one), move to another epoch, close.

After every step it checks `Schedule.check()` (the invariants of the
module docstring) and a model kept independently of the schedule: which
keys have arrived, how many outcomes were discarded, and that every
outcome produced is accounted for exactly once (handed out, discarded,
waiting, or dropped at close). Each read runs the caller's loop and must
end, with the outcome produced for that very key, within a bounded number
of waits: nothing waits forever, nothing spins.

`ReReadCache` and `OrderWatch` get example-based tests at the end.
"""

from __future__ import annotations

import dataclasses
import itertools

import _faults
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from keras_oom.pool import Arrived, Joined, Lost
from keras_oom.schedule import OrderWatch, ReReadCache, Schedule

# No processes here; the limit leaves Hypothesis time to shrink a failure
# (a minute or two), which a green run never needs (a few seconds).
pytestmark = pytest.mark.timeout(300)

# Waits in one read in which anything may happen; then the pool calms down
# (every busy worker delivers, every vacant slot restarts), and the read must
# end within a few more.
WILD_WAITS = 6
CALM_WAITS = 3


@dataclasses.dataclass(frozen=True)
class Produced:
    """One outcome a simulated worker produced: a batch or an error."""

    key: tuple[int, int]
    serial: int
    error: bool


class ScheduleMachine(RuleBasedStateMachine):
    @initialize(
        window=st.integers(0, 4),
        batches_per_epoch=st.integers(1, 5),
        size=st.integers(1, 4),
        data=st.data(),
    )
    def start(self, window, batches_per_epoch, size, data):
        self.window = window
        self.bpe = batches_per_epoch
        self.size = size
        self.serials = itertools.count()
        self.produced = 0
        self.handed: set[int] = set()
        self.discarded_serials: set[int] = set()
        self.discarded_before = 0  # by schedules dropped at close
        self.dropped_at_close = 0
        self.epoch = 0
        self.last = None
        self._open(data)

    def _open(self, data):
        """A new dataset's first use: start the pool, load from its epoch."""
        self.schedule = Schedule(self.window, self.bpe)
        self.live: dict[int, tuple[int, int] | None] = {}
        self.vacant: dict[int, int] = {}  # slot -> waits before it restarts
        # The model, kept without looking at the schedule.
        self.m_anchor: int | None = None
        self.m_wanted: tuple[int, int] | None = None
        self.m_arrived: dict[tuple[int, int], Produced] = {}
        self.m_discarded = 0
        events = []
        for slot in range(self.size):
            if data.draw(st.booleans(), label=f"slot {slot} starts"):
                self.live[slot] = None
                events.append(Joined(slot))
            else:
                self.vacant[slot] = data.draw(st.integers(1, 3))
        self._apply(events)
        self._restart(self.epoch)

    # -- the model ------------------------------------------------------------

    def _lin(self, key):
        return key[0] * self.bpe + key[1]

    def _key(self, lin):
        return (lin // self.bpe, lin % self.bpe)

    def _m_window(self):
        if self.m_anchor is None:
            return []
        return [self._key(self.m_anchor + i) for i in range(1, self.window + 1)]

    def _m_keep(self, key):
        return key == self.m_wanted or key in self._m_window()

    def _m_settle(self, key, produced):
        if self._m_keep(key):
            assert key not in self.m_arrived, f"{key} arrived twice"
            self.m_arrived[key] = produced
        else:
            self.m_discarded += 1
            self.discarded_serials.add(produced.serial)

    def _m_discard_outside(self):
        for key in [k for k in self.m_arrived if not self._m_keep(k)]:
            self.discarded_serials.add(self.m_arrived.pop(key).serial)
            self.m_discarded += 1

    # -- what prefetch.py does --------------------------------------------------

    def _apply(self, events):
        """`PrefetchLoaderDataset._apply`, mirrored in the model."""
        for event in events:
            if isinstance(event, Joined):
                self.schedule.add_worker(event.slot)
            elif isinstance(event, Arrived):
                key = self.schedule.arrived(event.slot, event.outcome)
                assert key == event.key, (key, event.key)
                self._m_settle(key, event.outcome)
            elif isinstance(event, Lost):
                key = self.schedule.lost(event.slot, event.outcome)
                assert key == event.key, (key, event.key)
                if event.outcome is not None:
                    self._m_settle(key, event.outcome)

    def _dispatch(self):
        """`PrefetchLoaderDataset._dispatch`: send each assignment."""
        sent = self.schedule.assign()
        for slot, key in sent:
            # Only to a worker the pool knows, idle, with a key worth loading.
            assert self.live.get(slot, "gone") is None, (slot, self.live)
            assert key not in self.live.values(), f"{key} sent twice"
            assert key not in self.m_arrived, f"{key} loaded again while waiting"
            assert self._m_keep(key), f"{key} is neither wanted nor in the window"
            self.live[slot] = key
        self._check()

    def _restart(self, epoch):
        """`PrefetchLoaderDataset._restart_window`."""
        self.schedule.restart(epoch)
        self.m_wanted, self.m_anchor = None, epoch * self.bpe - 1
        self._m_discard_outside()
        self._dispatch()

    def _request(self, key):
        self.schedule.request(key)
        self.m_wanted, self.m_anchor = key, self._lin(key)
        self._m_discard_outside()

    def _take(self, key):
        done, outcome = self.schedule.take(key)
        assert done == (key in self.m_arrived), (key, done, self.m_arrived)
        if not done:
            assert outcome is None
            return False, None
        expected = self.m_arrived.pop(key)
        assert outcome is expected, (outcome, expected)
        assert outcome.key == key, f"{key} got the outcome of {outcome.key}"
        assert outcome.serial not in self.handed, "an outcome handed out twice"
        assert outcome.serial not in self.discarded_serials, "a discarded outcome"
        self.handed.add(outcome.serial)
        if self.m_wanted == key:
            self.m_wanted = None
        return True, outcome

    # -- the simulated pool -----------------------------------------------------

    def _produce(self, key, error):
        self.produced += 1
        return Produced(key, next(self.serials), error)

    def _end(self, slot, restarts, countdown, events):
        """The worker in `slot` is gone; the pool restarts it, or cannot yet."""
        del self.live[slot]
        if restarts:
            self.live[slot] = None
            events.append(Joined(slot))
        else:
            self.vacant[slot] = countdown

    def _busy(self):
        return sorted(s for s, k in self.live.items() if k is not None)

    def _idle(self):
        return sorted(s for s, k in self.live.items() if k is None)

    def _happen(self, data, events):
        """One thing the pool notices in a wait, drawn by Hypothesis; False
        if nothing can happen."""
        choices = []
        if self._busy():
            choices += ["arrive", "arrive", "arrive", "die", "interrupt"]
        if self._idle():
            choices.append("die idle")
        if any(n == 0 for n in self.vacant.values()):
            choices.append("join")
        if not choices:
            return False
        what = data.draw(st.sampled_from(choices), label="event")
        if what == "join":
            slot = data.draw(
                st.sampled_from([s for s, n in self.vacant.items() if not n])
            )
            del self.vacant[slot]
            self.live[slot] = None
            events.append(Joined(slot))
            return True
        slots = self._idle() if what == "die idle" else self._busy()
        slot = data.draw(st.sampled_from(slots), label="slot")
        key = self.live[slot]
        if what == "arrive":
            error = data.draw(st.booleans(), label="loader error")
            self.live[slot] = None
            events.append(Arrived(slot, key, self._produce(key, error)))
            return True
        # Died idle, or its reply never came (the key is sent again): None.
        outcome = self._produce(key, True) if what == "die" else None
        events.append(Lost(slot, key, outcome))
        restarts = data.draw(st.booleans(), label="restarts")
        self._end(slot, restarts, data.draw(st.integers(1, 3)), events)
        return True

    def _wait(self, data, block):
        """`WorkerPool.wait(0)` (block=False) or `wait()`."""
        for slot in self.vacant:  # time passes
            self.vacant[slot] = max(0, self.vacant[slot] - 1)
        if block and not self._busy() and self.vacant:
            # Nothing in flight: the real wait sleeps until a retry is due.
            for slot in self.vacant:
                self.vacant[slot] = 0
        if not block and not self._busy() and not self.vacant:
            return []
        events: list = []
        # wait() returns at once with nothing if nothing is in flight and no
        # slot is vacant; the caller's loop would then spin.
        least = 1 if block else 0
        for _ in range(data.draw(st.integers(least, 3), label="events")):
            if not self._happen(data, events):
                break
        return events

    def _calm_wait(self):
        """A wait in which every busy worker delivers, every slot restarts."""
        events: list = []
        for slot in self._busy():
            key = self.live[slot]
            self.live[slot] = None
            events.append(Arrived(slot, key, self._produce(key, False)))
        for slot in sorted(self.vacant):
            del self.vacant[slot]
            self.live[slot] = None
            events.append(Joined(slot))
        return events

    # -- checks -----------------------------------------------------------------

    def _check(self):
        self.schedule.check()
        assert set(self.schedule.arrived_keys()) == set(self.m_arrived)
        assert len(self.m_arrived) <= self.window + 1
        assert self.schedule.discarded == self.m_discarded
        assert self.schedule.wanted == self.m_wanted
        assert self.schedule.window_keys() == self._m_window()
        # The schedule and the pool agree on who loads what.
        assert self.schedule.held() == {s: k for s, k in self.live.items() if k}
        assert sorted(self.schedule.idle()) == self._idle()
        # Every outcome produced is in exactly one place.
        accounted = (
            len(self.handed)
            + self.discarded_before
            + self.m_discarded
            + len(self.m_arrived)
            + self.dropped_at_close
        )
        assert accounted == self.produced, (accounted, self.produced)

    @invariant()
    def invariants_hold(self):
        self._check()

    # -- the caller's side --------------------------------------------------------

    def _next_key(self):
        if self.last is None:
            return (self.epoch, 0)
        return self._key(self._lin(self.last) + 1)

    def _pick_key(self, data):
        how = data.draw(st.sampled_from(["next", "next", "next", "same", "random"]))
        if how == "next" or (how == "same" and self.last is None):
            return self._next_key()
        if how == "same":
            return self.last
        return (
            data.draw(st.integers(max(0, self.epoch - 1), self.epoch + 2)),
            data.draw(st.integers(0, self.bpe - 1)),
        )

    def _fetch(self, data, key, interrupt_after=None):
        """`PrefetchLoaderDataset._fetch`; False if interrupted (Ctrl-C in
        `pool.wait()`) after `interrupt_after` waits."""
        self._apply(self._wait(data, block=False))
        self._request(key)
        self._dispatch()
        done, outcome = self._take(key)
        waits = 0
        while not done:
            if waits == interrupt_after:
                return False
            waits += 1
            assert waits <= WILD_WAITS + CALM_WAITS, f"waits forever for {key}"
            if waits <= WILD_WAITS:
                events = self._wait(data, block=True)
            else:
                events = self._calm_wait()
            assert events, f"wait() returns nothing while {key} is wanted: spins"
            self._apply(events)
            self._dispatch()
            done, outcome = self._take(key)
        self._dispatch()
        assert outcome.key == key and outcome.serial in self.handed
        return True

    @rule(data=st.data())
    def read(self, data):
        """`ds[i]`: must end with this key's outcome (a batch or an error)."""
        key = self._pick_key(data)
        assert self._fetch(data, key)
        self.last = key
        self.epoch = max(self.epoch, key[0])

    @rule(data=st.data(), waits=st.integers(0, 2))
    def read_interrupted(self, data, waits):
        """Ctrl-C while `ds[i]` waits: the key stays wanted, no outcome lost."""
        self._fetch(data, self._pick_key(data), interrupt_after=waits)

    @rule(data=st.data())
    def pool_reports(self, data):
        """Between reads: what the next `wait(0)` reports, applied at once."""
        self._apply(self._wait(data, block=False))
        self._dispatch()

    @precondition(lambda self: any(k is not None for k in self.live.values()))
    @rule(data=st.data())
    def worker_finishes(self, data):
        slot = data.draw(st.sampled_from(self._busy()))
        key = self.live[slot]
        self.live[slot] = None
        outcome = self._produce(key, data.draw(st.booleans(), label="loader error"))
        self._apply([Arrived(slot, key, outcome)])
        self._dispatch()

    @precondition(lambda self: any(k is not None for k in self.live.values()))
    @rule(data=st.data(), restarts=st.booleans(), countdown=st.integers(1, 3))
    def worker_dies_busy(self, data, restarts, countdown):
        slot = data.draw(st.sampled_from(self._busy()))
        key = self.live[slot]
        events = [Lost(slot, key, self._produce(key, True))]
        self._end(slot, restarts, countdown, events)
        self._apply(events)
        self._dispatch()

    @precondition(lambda self: any(k is not None for k in self.live.values()))
    @rule(data=st.data(), restarts=st.booleans(), countdown=st.integers(1, 3))
    def reply_interrupted(self, data, restarts, countdown):
        """The worker is lost without an outcome: its key is sent again."""
        slot = data.draw(st.sampled_from(self._busy()))
        events = [Lost(slot, self.live[slot], None)]
        self._end(slot, restarts, countdown, events)
        self._apply(events)
        self._dispatch()

    @precondition(lambda self: any(k is None for k in self.live.values()))
    @rule(data=st.data(), restarts=st.booleans(), countdown=st.integers(1, 3))
    def worker_dies_idle(self, data, restarts, countdown):
        slot = data.draw(st.sampled_from(self._idle()))
        events = [Lost(slot, None, None)]
        self._end(slot, restarts, countdown, events)
        self._apply(events)
        self._dispatch()

    @precondition(lambda self: bool(self.vacant))
    @rule(data=st.data())
    def worker_joins(self, data):
        """A slot whose restart failed is filled at a later try."""
        slot = data.draw(st.sampled_from(sorted(self.vacant)))
        del self.vacant[slot]
        self.live[slot] = None
        self._apply([Joined(slot)])
        self._dispatch()

    @rule(data=st.data())
    def epoch_change(self, data):
        """`on_epoch_end` / `set_epoch`: load from the new epoch's start."""
        epoch = data.draw(st.one_of(st.just(self.epoch + 1), st.integers(0, 4)))
        self.epoch = epoch
        self.last = None
        self._restart(epoch)

    @rule(data=st.data())
    def close(self, data):
        """The pool ends every worker; the schedule goes with it."""
        events = [Lost(slot, key, None) for slot, key in sorted(self.live.items())]
        self.live.clear()
        self.vacant.clear()
        self._apply(events)
        assert self.schedule.held() == {}, "a key still in flight after close"
        assert self.schedule.workers == 0
        assert self.schedule.assign() == [], "work sent to a closed pool"
        self._check()
        self.discarded_before += self.m_discarded
        self.dropped_at_close += len(self.m_arrived)
        self.last = None
        self._open(data)  # a new dataset, as after close() one would build


ScheduleMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None
)
test_schedule_machine = ScheduleMachine.TestCase


# -- the schedule, by example -----------------------------------------------------


def test_window_crosses_the_epoch_end():
    schedule = Schedule(window=3, batches_per_epoch=2)
    schedule.request((0, 1))
    assert schedule.window_keys() == [(1, 0), (1, 1), (2, 0)]


def test_an_outcome_outside_the_window_is_discarded_and_counted():
    schedule = Schedule(window=1, batches_per_epoch=10)
    schedule.add_worker(0)
    schedule.add_worker(1)
    schedule.request((0, 0))
    assert dict(schedule.assign()) == {0: (0, 0), 1: (0, 1)}
    schedule.request((0, 5))  # random access: (0, 0) and (0, 1) are not needed
    assert schedule.arrived(0, "zero") == (0, 0)
    assert schedule.lost(1, "died") == (0, 1)
    assert schedule.discarded == 2
    assert schedule.arrived_keys() == []
    assert schedule.assign() == [(0, (0, 5))]


def test_a_lost_reply_sends_the_key_again():
    schedule = Schedule(window=0, batches_per_epoch=4)
    schedule.add_worker(0)
    schedule.request((0, 2))
    assert schedule.assign() == [(0, (0, 2))]
    assert schedule.lost(0) == (0, 2)
    schedule.add_worker(1)
    assert schedule.assign() == [(1, (0, 2))]
    assert schedule.discarded == 0


# -- ReReadCache --------------------------------------------------------------------


def test_rereadcache_serves_a_reread_of_the_same_key():
    cache = ReReadCache(size=2)
    cache.seen((0, 0), "b0")
    cache.seen((0, 1), "b1")
    assert cache.get((0, 0)) == (True, "b0")
    assert cache.get((0, 1)) == (True, "b1")
    assert cache.get((1, 0)) == (False, None)  # another epoch's batch 0
    assert len(cache) == 2


def test_rereadcache_returns_copies():
    cache = ReReadCache()
    batch = np.zeros(3)
    cache.seen((0, 0), batch)
    batch[0] = 1  # the caller changes the batch it was handed
    hit, first = cache.get((0, 0))
    assert hit and first[0] == 0
    first[1] = 5  # and the copy it got from the cache
    assert cache.get((0, 0))[1][1] == 0


def test_rereadcache_forgets_after_a_later_batch():
    cache = ReReadCache(size=2)
    cache.seen((0, 0), "b0")
    cache.seen((0, 1), "b1")
    cache.seen((0, 2), "b2")
    assert len(cache) == 0
    assert cache.get((0, 0)) == (False, None)


def test_rereadcache_holds_one_epoch_only():
    """Issue 8, item 5: with two batches per epoch it was never cleared."""
    cache = ReReadCache(size=2)
    for epoch in range(30):
        cache.seen((epoch, 0), f"e{epoch}b0")
        cache.seen((epoch, 1), f"e{epoch}b1")
        assert len(cache) <= 2
        assert all(cache.get((old, 0))[0] is False for old in range(epoch))
    assert cache.get((29, 0)) == (True, "e29b0")
    cache.seen((30, 1), "x")  # a shuffled epoch starting at its batch 1
    assert len(cache) == 1
    assert cache.get((29, 0)) == (False, None)


def test_rereadcache_skips_values_that_cannot_be_copied():
    class NoCopy:
        def __deepcopy__(self, memo):
            raise TypeError("no copies")

    cache = ReReadCache()
    cache.seen((0, 0), NoCopy())
    assert cache.get((0, 0)) == (False, None)


class CopyRaises:
    """A batch whose deep copy raises `exc`, after `copies` copies worked."""

    def __init__(self, exc, copies=0):
        self.exc = exc
        self.copies = copies

    def __deepcopy__(self, memo):
        if self.copies <= 0:
            raise _faults.make(self.exc, "no copies")
        self.copies -= 1
        return CopyRaises(self.exc, 0)


@pytest.mark.parametrize("exc", sorted(_faults.CLASSES))
def test_rereadcache_skips_values_whose_copy_raises_any_class(exc):
    """Kind C: a batch whose `__deepcopy__` raised a `BaseException` (say
    `KeyboardInterrupt`) failed the read that had loaded it."""
    cache = ReReadCache()
    cache.seen((0, 0), CopyRaises(exc))
    assert cache.get((0, 0)) == (False, None)


@pytest.mark.parametrize("exc", sorted(_faults.CLASSES))
def test_rereadcache_forgets_a_kept_value_whose_second_copy_raises(exc):
    """Kind C: the copy handed out on a re-read raised (any class): a miss,
    the batch is loaded again, instead of a failed read."""
    cache = ReReadCache()
    cache.seen((0, 0), CopyRaises(exc, copies=1))  # kept: its first copy works
    assert len(cache) == 1
    assert cache.get((0, 0)) == (False, None)
    assert len(cache) == 0


def test_rereadcache_clear():
    cache = ReReadCache()
    cache.seen((0, 0), 1)
    cache.clear()
    assert len(cache) == 0


# -- OrderWatch ---------------------------------------------------------------------


def _reads(watch, keys, batches_per_epoch=10):
    """Feeds `keys` as `PrefetchLoaderDataset._note_order` does."""
    warned = []
    for key in keys:
        last = watch.last
        expected = None
        if last is not None:
            expected = (last[0], last[1] + 1)
            if expected[1] == batches_per_epoch:
                expected = (last[0] + 1, 0)
        warned.append(watch.note(key, expected))
    return warned


def test_orderwatch_in_order_never_warns():
    watch = OrderWatch()
    keys = [(e, b) for e in range(3) for b in range(10)]
    assert not any(_reads(watch, keys))
    assert watch.last == (2, 9)


def test_orderwatch_one_jump_does_not_warn():
    watch = OrderWatch()
    assert not any(_reads(watch, [(0, 0), (0, 1), (0, 6), (0, 7), (0, 8)]))
    assert not watch.warned


def test_orderwatch_a_repeated_read_is_not_out_of_order():
    watch = OrderWatch()
    assert not any(_reads(watch, [(0, 0), (0, 0), (0, 1), (0, 1), (0, 2)]))


def test_orderwatch_two_out_of_order_reads_warn_once():
    watch = OrderWatch()
    warned = _reads(watch, [(0, 0), (0, 5), (0, 2), (0, 8), (0, 3), (1, 4), (1, 7)])
    assert warned == [False, False, True, False, False, False, False]
    assert watch.warned


def test_orderwatch_batch_zero_never_counts():
    # Keras reads batch 0 before each epoch (JAX) and at each epoch's start.
    watch = OrderWatch()
    keys = [(0, 0), (0, 1), (0, 0), (0, 1), (0, 2), (0, 0), (0, 1), (0, 7)]
    assert not any(_reads(watch, keys))


def test_orderwatch_counts_per_epoch():
    watch = OrderWatch()
    # One jump in each epoch: never two in one epoch.
    keys = [(0, 0), (0, 4), (0, 5), (1, 0), (1, 6), (1, 7), (2, 0), (2, 3)]
    assert not any(_reads(watch, keys))
