"""The prefetcher's state machine (keras_oom/schedule.py), without processes.

`ScheduleMachine` drives a `Schedule` exactly as `PrefetchLoaderDataset`
does (`_fetch`, `_apply`, `_dispatch`, `_restart_window`: the glue, copied
by hand in the section "what prefetch.py does"), through a simulated pool:
a dict of live slots (slot -> key in flight, or None when idle), vacant
slots waiting to restart, and the events the pool has noticed but the glue
has not taken yet. Like the real `WorkerPool`, the simulated one changes
only inside `wait()`, whose events the glue takes and applies, then idle
workers are given work. Hypothesis picks what each wait reports: batches
arriving (values or loader errors of any class), workers dying busy or
idle, replies that never come (the key is sent again), restarts that fail
for a while; and what the caller does: read a key (mostly the next one,
sometimes the same or a random one), move to another epoch, close.

Exceptions of every class (`_faults.CLASSES`: `Exception`s, a frozen
dataclass, `KeyboardInterrupt`, `SystemExit`, `GeneratorExit`, a custom
`BaseException`) are injected at every step the glue performs (issue 14,
Kind C), each through `_inject(step)`, one call per step, so that they move
unchanged when the glue's copy is replaced by the real engine:

    encode  making a request (pickling its ids): the batch fails with it
    wait    the pool's wait, before or after it read its messages (Ctrl-C)
    decode  the pool turning a reply into an outcome: the batch fails
    apply   between two events the glue applies to the schedule

and a loader error of any class arrives as a batch's outcome. A read ends
with its key's outcome (re-raised when it is an error, as `_raise` does),
or with the exception injected into it; either way the invariants hold.

After every step it checks `Schedule.check()` (the invariants of the
module docstring), that the schedule, once it applies the events it has not
yet, agrees with the pool on who loads what, and a model kept independently
of the schedule: which keys have arrived, how many outcomes were discarded,
and that every outcome produced is accounted for exactly once (handed out,
discarded, waiting, in an event not yet applied, or dropped at close).
Each read runs the caller's loop and must end, with the outcome produced
for that very key, within a bounded number of waits (injections stop once
the pool calms down): nothing waits forever, nothing spins.

`ReReadCache` and `OrderWatch` get example-based tests at the end.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools

import _faults
import numpy as np
import pytest
from hypothesis import event as hypothesis_event
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from keras_oom.protocol import Arrived, Joined, Lost
from keras_oom.schedule import OrderWatch, ReReadCache, Schedule

# No processes here; the limit leaves Hypothesis time to shrink a failure
# (a minute or two), which a green run never needs (a few seconds).
pytestmark = pytest.mark.timeout(300)

# Waits in one read in which anything may happen; then the pool calms down
# (every busy worker delivers, every vacant slot restarts, nothing is
# injected), and the read must end within a few more.
WILD_WAITS = 6
CALM_WAITS = 3

CLASS_NAMES = sorted(_faults.CLASSES)
# What a failed batch raises: a loader's error, or the pool's for a death.
ERRORS = {**_faults.CLASSES, "WorkerDiedError": RuntimeError}
STEPS = ("encode", "wait", "decode", "apply")


@dataclasses.dataclass(frozen=True)
class Produced:
    """One outcome a simulated worker produced: a batch, or an error of
    class `error` (a name in `_faults.CLASSES`)."""

    key: tuple[int, int]
    serial: int
    error: str | None


def apply_event(schedule, event):
    """What `_apply` does with one event, to `schedule` only."""
    if isinstance(event, Joined):
        schedule.add_worker(event.worker_index)
        return None
    if isinstance(event, Arrived):
        return schedule.arrived(event.worker_index, event.outcome)
    return schedule.lost(event.worker_index, event.outcome)


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
        self.data = data
        self.calm = True  # no injections while a dataset starts
        self.injected: BaseException | None = None
        self._open(data)

    def _open(self, data):
        """A new dataset's first use: start the pool, load from its epoch."""
        self.schedule = Schedule(self.window, self.bpe)
        self.live: dict[int, tuple[int, int] | None] = {}
        self.vacant: dict[int, int] = {}  # slot -> waits before it restarts
        self.pool_events: list = []  # noticed by the pool, not yet taken
        self.pending: collections.deque = collections.deque()  # taken, unapplied
        # The model, kept without looking at the schedule.
        self.m_anchor: int | None = None
        self.m_wanted: tuple[int, int] | None = None
        self.m_arrived: dict[tuple[int, int], Produced] = {}
        self.m_discarded = 0
        for slot in range(self.size):
            if data.draw(st.booleans(), label=f"slot {slot} starts"):
                self.live[slot] = None
                self.pool_events.append(Joined(slot))
            else:
                self.vacant[slot] = data.draw(st.integers(1, 3))
        calm, self.calm = self.calm, True
        self._apply(self._take_events())
        self._restart(self.epoch)
        self.calm = calm

    # -- injected exceptions ----------------------------------------------------

    def _inject(self, step):
        """Raises an exception of any class at `step`, when Hypothesis says so."""
        if self.calm or self.data.draw(st.integers(0, 7), label=step) != 7:
            return
        name = self.data.draw(st.sampled_from(CLASS_NAMES), label=f"{step} raises")
        hypothesis_event(
            f"injected at {step}"
        )  # --hypothesis-show-statistics counts them
        self.injected = _faults.make(name, f"injected at {step}")
        raise self.injected

    def _was_injected(self, error):
        """Whether `error` is the exception `_inject` raised last; clears it."""
        injected, self.injected = self.injected, None
        return error is injected

    def _glue(self, action, *args):
        """Runs a glue `action` as the caller would; an injected exception
        ends it (the caller sees it), anything else is a failure."""
        try:
            return True, action(*args)
        except BaseException as e:
            if not self._was_injected(e):
                raise
            return False, e
        finally:
            self._check()

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

    # -- what prefetch.py does (the glue, copied by hand) ----------------------

    def _apply(self, events):
        """`PrefetchLoaderDataset._apply`, mirrored in the model: each event
        leaves the queue as it is applied."""
        self.pending.extend(events)
        while self.pending:
            self._inject("apply")
            event = self.pending.popleft()
            key = apply_event(self.schedule, event)
            if isinstance(event, Arrived):
                assert key == event.key, (key, event.key)
                self._m_settle(key, event.outcome)
            elif isinstance(event, Lost) and key is not None and event.outcome:
                self._m_settle(key, event.outcome)

    def _dispatch(self):
        """`PrefetchLoaderDataset._dispatch`: apply what the pool noticed,
        then send each assignment; one that cannot be made fails its key."""
        self._apply(self._take_events())
        assignments = self.schedule.assign()
        while assignments:
            slot, key = assignments.pop(0)
            try:
                self._inject("encode")
            except BaseException as e:
                if not self._was_injected(e):
                    raise
                produced = self._produce(key, type(e).__name__)
                self.schedule.arrived(slot, produced)
                self._m_settle(key, produced)
                assignments += self.schedule.assign()
                continue
            self._submit(slot, key)
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

    def _fetch(self, key):
        """`PrefetchLoaderDataset._fetch`: the outcome produced for `key`."""
        self._wait(block=False)
        self._apply(self._take_events())
        self._request(key)
        self._dispatch()
        done, outcome = self._take(key)
        waits = 0
        while not done:
            assert self._busy() or self.vacant, f"nothing to wait for: {key}"
            waits += 1
            assert waits <= WILD_WAITS + CALM_WAITS, f"waits forever for {key}"
            self.calm = waits > WILD_WAITS
            self._wait(block=True)
            assert self.pool_events, f"wait() noticed nothing while {key} is wanted"
            self._apply(self._take_events())
            self._dispatch()
            done, outcome = self._take(key)
        self._dispatch()
        assert outcome.key == key and outcome.serial in self.handed
        return outcome

    def _raise(self, outcome):
        """`PrefetchLoaderDataset._raise`: a failed batch raises its error."""
        raise ERRORS[outcome.error](f"loading {outcome.key} failed")

    def _read(self, key):
        """`ds[i]`: the batch, or the batch's error raised."""
        outcome = self._fetch(key)
        self.last = key
        self.epoch = max(self.epoch, key[0])
        if outcome.error is not None:
            try:
                self._raise(outcome)
            except BaseException as e:
                assert type(e) is ERRORS[outcome.error], (e, outcome)
            else:
                raise AssertionError("_raise did not raise")
        return outcome

    # -- the simulated pool -----------------------------------------------------

    def _produce(self, key, error):
        self.produced += 1
        return Produced(key, next(self.serials), error)

    def _take_events(self):
        """`WorkerPool.take_events`."""
        events, self.pool_events = self.pool_events, []
        return events

    def _submit(self, slot, key):
        """`WorkerPool.submit`: only to a worker the pool has idle, with a
        key worth loading."""
        assert self.live.get(slot, "gone") is None, (slot, self.live)
        assert key not in self.live.values(), f"{key} sent twice"
        assert key not in self.m_arrived, f"{key} loaded again while waiting"
        assert self._m_keep(key), f"{key} is neither wanted nor in the window"
        self.live[slot] = key

    def _end(self, slot, restarts, countdown):
        """The worker in `slot` is gone; the pool restarts it, or cannot yet."""
        del self.live[slot]
        if restarts:
            self.live[slot] = None
            self.pool_events.append(Joined(slot))
        else:
            self.vacant[slot] = countdown

    def _busy(self):
        return sorted(s for s, k in self.live.items() if k is not None)

    def _idle(self):
        return sorted(s for s, k in self.live.items() if k is None)

    def _arrive(self, slot, error):
        """A reply from `slot`, decoded as `WorkerPool._handle` does: an
        exception while decoding it is that batch's error."""
        key = self.live[slot]
        try:
            self._inject("decode")
        except BaseException as e:
            if not self._was_injected(e):
                raise
            error = type(e).__name__
        self.live[slot] = None
        self.pool_events.append(Arrived(slot, key, self._produce(key, error)))

    def _happen(self, data):
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
            self.pool_events.append(Joined(slot))
            return True
        slots = self._idle() if what == "die idle" else self._busy()
        slot = data.draw(st.sampled_from(slots), label="slot")
        key = self.live[slot]
        if what == "arrive":
            self._arrive(slot, self._draw_error(data))
            return True
        # Died idle, or its reply never came (the key is sent again): None.
        outcome = self._produce(key, "WorkerDiedError") if what == "die" else None
        self.pool_events.append(Lost(slot, outcome))
        restarts = data.draw(st.booleans(), label="restarts")
        self._end(slot, restarts, data.draw(st.integers(1, 3)))
        return True

    def _draw_error(self, data):
        """No error, mostly; else a loader error of any class."""
        return data.draw(
            st.one_of(st.none(), st.none(), st.sampled_from(CLASS_NAMES)),
            label="loader error",
        )

    def _wait(self, block):
        """`WorkerPool.wait(0)` (block=False) or `wait()`: what it notices
        stays in `pool_events` until taken, even when it raises."""
        self._inject("wait")  # e.g. Ctrl-C in the blocking wait
        for slot in self.vacant:  # time passes
            self.vacant[slot] = max(0, self.vacant[slot] - 1)
        if self.calm:
            self._calm_wait()
            return
        if block and not self._busy() and self.vacant:
            # Nothing in flight: the real wait sleeps until a retry is due.
            for slot in self.vacant:
                self.vacant[slot] = 0
        if not block and not self._busy() and not self.vacant:
            return
        # wait() returns at once with nothing if nothing is in flight and no
        # slot is vacant; the caller's loop would then spin.
        least = 1 if block else 0
        for _ in range(self.data.draw(st.integers(least, 3), label="events")):
            if not self._happen(self.data):
                break
        self._inject("wait")  # e.g. Ctrl-C delivered once the state is kept

    def _calm_wait(self):
        """A wait in which every busy worker delivers, every slot restarts."""
        for slot in self._busy():
            key = self.live[slot]
            self.live[slot] = None
            self.pool_events.append(Arrived(slot, key, self._produce(key, None)))
        for slot in sorted(self.vacant):
            del self.vacant[slot]
            self.live[slot] = None
            self.pool_events.append(Joined(slot))

    # -- checks -----------------------------------------------------------------

    def _unapplied(self):
        return [*self.pending, *self.pool_events]

    def _check(self):
        # An exception between two events leaves the rest pending, and the
        # glue assigns only once it has applied them all.
        self.schedule.check(assigned=not self.pending)
        assert set(self.schedule.arrived_keys()) == set(self.m_arrived)
        assert len(self.m_arrived) <= self.window + 1
        assert self.schedule.discarded == self.m_discarded
        assert self.schedule.wanted == self.m_wanted
        assert self.schedule.window_keys() == self._m_window()
        # The schedule and the pool agree on who loads what, once the
        # schedule has applied what it has not yet.
        # (Not its invariants: until the glue dispatches, a worker that joined
        # may be idle while the wanted key waits.)
        projected = copy.deepcopy(self.schedule)
        for event in self._unapplied():
            apply_event(projected, event)
        assert projected.held() == {s: k for s, k in self.live.items() if k}
        assert sorted(projected.idle()) == self._idle()
        # Every outcome produced is in exactly one place.
        in_events = sum(
            1 for e in self._unapplied() if getattr(e, "outcome", None) is not None
        )
        accounted = (
            len(self.handed)
            + self.discarded_before
            + self.m_discarded
            + len(self.m_arrived)
            + in_events
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

    def _step(self, data):
        """Starts a rule: Hypothesis draws for it, injections allowed."""
        self.data, self.calm = data, False

    @rule(data=st.data())
    def read(self, data):
        """`ds[i]`: ends with this key's outcome (a batch, or its error
        raised), or with the exception injected into the read."""
        self._step(data)
        self._glue(self._read, self._pick_key(data))

    @rule(data=st.data())
    def pool_reports(self, data):
        """Between reads: what the next `wait(0)` reports, applied at once."""
        self._step(data)

        def report():
            self._wait(block=False)
            self._apply(self._take_events())
            self._dispatch()

        self._glue(report)

    @precondition(lambda self: any(k is not None for k in self.live.values()))
    @rule(data=st.data())
    def worker_finishes(self, data):
        self._step(data)
        self._arrive(data.draw(st.sampled_from(self._busy())), self._draw_error(data))
        self._glue(self._dispatch)

    @precondition(lambda self: any(k is not None for k in self.live.values()))
    @rule(data=st.data(), restarts=st.booleans(), countdown=st.integers(1, 3))
    def worker_dies_busy(self, data, restarts, countdown):
        self._step(data)
        slot = data.draw(st.sampled_from(self._busy()))
        key = self.live[slot]
        self.pool_events.append(Lost(slot, self._produce(key, "WorkerDiedError")))
        self._end(slot, restarts, countdown)
        self._glue(self._dispatch)

    @precondition(lambda self: any(k is not None for k in self.live.values()))
    @rule(data=st.data(), restarts=st.booleans(), countdown=st.integers(1, 3))
    def reply_interrupted(self, data, restarts, countdown):
        """The worker is lost without an outcome: its key is sent again."""
        self._step(data)
        slot = data.draw(st.sampled_from(self._busy()))
        self.pool_events.append(Lost(slot, None))
        self._end(slot, restarts, countdown)
        self._glue(self._dispatch)

    @precondition(lambda self: any(k is None for k in self.live.values()))
    @rule(data=st.data(), restarts=st.booleans(), countdown=st.integers(1, 3))
    def worker_dies_idle(self, data, restarts, countdown):
        self._step(data)
        slot = data.draw(st.sampled_from(self._idle()))
        self.pool_events.append(Lost(slot, None))
        self._end(slot, restarts, countdown)
        self._glue(self._dispatch)

    @precondition(lambda self: bool(self.vacant))
    @rule(data=st.data())
    def worker_joins(self, data):
        """A slot whose restart failed is filled at a later try."""
        self._step(data)
        slot = data.draw(st.sampled_from(sorted(self.vacant)))
        del self.vacant[slot]
        self.live[slot] = None
        self.pool_events.append(Joined(slot))
        self._glue(self._dispatch)

    @rule(data=st.data())
    def epoch_change(self, data):
        """`on_epoch_end` / `set_epoch`: load from the new epoch's start."""
        self._step(data)
        epoch = data.draw(st.one_of(st.just(self.epoch + 1), st.integers(0, 4)))
        self.epoch = epoch
        self.last = None
        self._glue(self._restart, epoch)

    @rule(data=st.data())
    def close(self, data):
        """The pool ends every worker; the schedule goes with it."""
        self.calm = True
        self._apply(self._take_events())
        events = [Lost(slot, None) for slot in sorted(self.live)]
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


@pytest.mark.parametrize("exc", CLASS_NAMES)
def test_rereadcache_skips_values_whose_copy_raises_any_class(exc):
    """Kind C: a batch whose `__deepcopy__` raised a `BaseException` (say
    `KeyboardInterrupt`) failed the read that had loaded it."""
    cache = ReReadCache()
    cache.seen((0, 0), CopyRaises(exc))
    assert cache.get((0, 0)) == (False, None)


@pytest.mark.parametrize("exc", CLASS_NAMES)
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
