"""The prefetcher's state machine, inside the real engine, without processes.

`ScheduleMachine` drives the real `engine.Prefetcher` (no copy of its
glue here) over a fake executor (`FakeExecutor`, the executor interface of
executor.py over a simulated pool): a dict of live workers (worker_index ->
key in flight, or None when idle), vacant workers waiting to restart, and
the events the pool has noticed but the engine has not taken yet. Like the
real `ProcessPool`, the simulated one changes only inside `wait()`.
Hypothesis picks what each wait reports: batches arriving (values or
loader errors of any class), workers dying busy or idle, replies that never
come (the key is sent again), restarts that fail for a while; and what the
caller does: read a key (mostly the next one, sometimes the same or a
random one), move to another epoch, close.

Exceptions of every class (`_faults.CLASSES`: `Exception`s, a frozen
dataclass, `KeyboardInterrupt`, `SystemExit`, `GeneratorExit`, a custom
`BaseException`) are injected at every step of a read, each through
`_inject(step)`, from the fakes the engine calls:

    encode  making a request (the source's ids): the batch fails with it
    wait    the executor's wait, before or after it read its messages (Ctrl-C)
    decode  the executor turning a reply into an outcome: the batch fails
    apply   before each event the engine applies to the schedule

and a loader error of any class arrives as a batch's outcome. A read ends
with its key's outcome, or with the exception injected into it; either way
the invariants hold.

After every step it checks `Schedule.check()` (the invariants of the
module docstring), that the schedule, once it applies the events it has not
yet, agrees with the pool on who loads what, and a model kept independently
of the schedule (`ModelSchedule` only tells it when the engine called the
schedule): which keys have arrived, how many outcomes were discarded, and
that every outcome produced is accounted for exactly once (handed out,
discarded, waiting, in an event not yet applied, or dropped at close). Each
read must end, with the outcome produced for that very key, within a
bounded number of waits (injections stop once the pool calms down):
nothing waits forever, nothing spins.

`ReReadCache` and `OrderWatch` have their own tests (test_readahead.py).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import warnings

import _faults
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

from keras_oom.engine import Prefetcher
from keras_oom.protocol import Arrived, Joined, Lost, WorkerSetup
from keras_oom.readahead import ReReadCache
from keras_oom.schedule import Schedule
from keras_oom.stats import ReadStats

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
    """One outcome produced: a batch, or an error of class `error` (a name
    in `_faults.CLASSES`). It reads as an `Outcome` to the engine; one that
    stands for the engine's own `Outcome` (a request it could not make)
    names it as `original`."""

    key: tuple[int, int]
    serial: int
    error: str | None
    original: object = dataclasses.field(default=None, compare=False)
    value: object = None
    seconds: float = 0.0
    pid: int = 0


class ModelSchedule(Schedule):
    """The real `Schedule`, reporting each call to the machine's model.

    The model (`ScheduleMachine._m_*`) is kept without looking at the
    schedule; this only tells it *when* the engine asked the schedule
    something, so that the two can be compared after every step.
    """

    def __init__(self, machine, window, batches_per_epoch):
        super().__init__(window, batches_per_epoch)
        self.machine = machine

    def plain(self):
        """A plain `Schedule` with this one's state, for projections."""
        copy_ = Schedule.__new__(Schedule)
        for name, value in vars(self).items():
            if name != "machine":  # containers copied; outcomes shared
                setattr(copy_, name, copy.copy(value))
        return copy_

    def request(self, key):
        super().request(key)
        self.machine._m_request(key)

    def restart(self, epoch):
        super().restart(epoch)
        self.machine._m_restart(epoch)

    def arrived(self, worker, outcome):
        key = super().arrived(worker, outcome)
        self.machine._m_settle(key, outcome)
        return key

    def lost(self, worker, outcome=None):
        key = super().lost(worker, outcome)
        if key is not None and outcome is not None:
            self.machine._m_settle(key, outcome)
        return key

    def take(self, key):
        done, outcome = super().take(key)
        self.machine._m_take(key, done, outcome)
        return done, outcome


class FakeExecutor:
    """The executor interface (executor.py) over the machine's simulated
    pool: it changes only inside `wait()`, like the real one."""

    def __init__(self, machine):
        self.machine = machine
        self.started_at = 0.0
        self.retired_cpu_seconds = 0.0
        self.closed = False
        self.pids: list[int] = []

    def start(self, setup, num_workers, *, timeout=None):
        self.machine._start_workers(num_workers)

    def submit(self, worker_index, load):
        self.machine._submit(worker_index, load.key)

    def wait(self, timeout=None):
        self.machine._wait(block=timeout != 0)

    def take_events(self):
        return self.machine._take_events()

    def expecting(self):
        return bool(self.machine._busy() or self.machine.vacant)

    def kill(self, worker_index):  # the engine never kills; the pool does
        raise AssertionError("the engine killed a worker")

    def close(self):
        self.closed = True

    def raise_if_broken(self):
        pass

    def worker_stats(self):
        return []


class FakeSource:
    """Each key's ids are the key itself; making a request may raise."""

    def __init__(self, machine):
        self.machine = machine

    def ids(self, epoch, batch):
        self.machine._inject("encode")
        return [(epoch, batch)]

    def seed_of(self, epoch, batch):
        return (0, epoch, batch)


class InjectingQueue(collections.deque):
    """The engine's queue of events to apply, with an exception of any
    class possible before each one leaves it (only a bug could raise there:
    SIGINT is deferred), to show that no event is lost or applied twice."""

    def __init__(self, machine):
        super().__init__()
        self.machine = machine

    def popleft(self):
        self.machine._inject("apply")
        return super().popleft()


def apply_event(schedule, event):
    """What the engine does with one event, to `schedule` only."""
    if isinstance(event, Joined):
        schedule.add_worker(event.worker_index)
    elif isinstance(event, Arrived):
        schedule.arrived(event.worker_index, event.outcome)
    else:
        schedule.lost(event.worker_index, event.outcome)


class ScheduleMachine(RuleBasedStateMachine):
    @initialize(
        batches_per_epoch=st.integers(1, 5), size=st.integers(1, 4), data=st.data()
    )
    def start(self, batches_per_epoch, size, data):
        self.window = size  # the engine loads `num_workers` batches ahead
        self.bpe = batches_per_epoch
        self.size = size
        self.serials = itertools.count()
        self.produced = 0
        self.handed: set[int] = set()
        self.discarded_serials: set[int] = set()
        self.discarded_before = 0  # by engines dropped at close
        self.dropped_at_close = 0
        self.epoch = 0
        self.last = None
        self.data = data
        self.waits = 0  # blocking waits in this step
        self.calm = True  # no injections while a dataset starts
        self.injected: BaseException | None = None
        self._open(data)

    def _open(self, data):
        """A new dataset's first use: start the engine, load from its epoch."""
        self.live: dict[int, tuple[int, int] | None] = {}
        self.vacant: dict[int, int] = {}  # worker -> waits before it restarts
        self.pool_events: list = []  # noticed by the pool, not yet taken
        # The model, kept without looking at the schedule.
        self.m_anchor: int | None = None
        self.m_wanted: tuple[int, int] | None = None
        self.m_arrived: dict[tuple[int, int], Produced] = {}
        self.m_discarded = 0
        self.executor = FakeExecutor(self)
        engine = Prefetcher(
            self.executor,
            FakeSource(self),
            num_workers=self.size,
            batches_per_epoch=self.bpe,
            reads=ReadStats(),
        )
        engine._pending = InjectingQueue(self)
        engine.schedule = self.schedule = ModelSchedule(self, self.window, self.bpe)
        engine.cache = ReReadCache(size=0)  # re-reads go to the schedule
        self.engine = engine
        calm, self.calm = self.calm, True
        engine.start(WorkerSetup(len, None), timeout=None, epoch=self.epoch, start=0)
        self.calm = calm

    def _start_workers(self, num_workers):
        assert num_workers == self.size
        for worker in range(num_workers):
            if self.data.draw(st.booleans(), label=f"worker {worker} starts"):
                self.live[worker] = None
                self.pool_events.append(Joined(worker))
            else:
                self.vacant[worker] = self.data.draw(st.integers(1, 3))

    # -- injected exceptions ----------------------------------------------------

    def _inject(self, step):
        """Raises an exception of any class at `step`, when Hypothesis says so."""
        if self.calm or self.data.draw(st.integers(0, 7), label=step) != 7:
            return
        name = self.data.draw(st.sampled_from(CLASS_NAMES), label=f"{step} raises")
        hypothesis_event(f"injected at {step}")  # --hypothesis-show-statistics
        self.injected = _faults.make(name, f"injected at {step}")
        raise self.injected

    def _was_injected(self, error):
        """Whether `error` is the exception `_inject` raised last; clears it."""
        injected, self.injected = self.injected, None
        return error is injected

    def _glue(self, action, *args):
        """Runs an engine `action` as the caller would; an injected exception
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

    def _m_settle(self, key, outcome):
        if not isinstance(outcome, Produced):
            # A request the engine could not make: the error it raised.
            assert self._was_injected(outcome.error), outcome
            outcome = self._produce(key, type(outcome.error).__name__, outcome)
        else:
            assert outcome.key == key, f"{key} settled with {outcome.key}'s outcome"
        if self._m_keep(key):
            assert key not in self.m_arrived, f"{key} arrived twice"
            self.m_arrived[key] = outcome
        else:
            self.m_discarded += 1
            self.discarded_serials.add(outcome.serial)

    def _m_discard_outside(self):
        for key in [k for k in self.m_arrived if not self._m_keep(k)]:
            self.discarded_serials.add(self.m_arrived.pop(key).serial)
            self.m_discarded += 1

    def _m_request(self, key):
        self.m_wanted, self.m_anchor = key, self._lin(key)
        self._m_discard_outside()

    def _m_restart(self, epoch):
        self.m_wanted, self.m_anchor = None, epoch * self.bpe - 1
        self._m_discard_outside()

    def _m_take(self, key, done, outcome):
        assert done == (key in self.m_arrived), (key, done, self.m_arrived)
        if not done:
            assert outcome is None
            return
        expected = self.m_arrived.pop(key)
        assert outcome is (expected.original or expected), (outcome, expected)
        assert expected.key == key, f"{key} got the outcome of {expected.key}"
        assert expected.serial not in self.handed, "an outcome handed out twice"
        assert expected.serial not in self.discarded_serials, "a discarded outcome"
        self.handed.add(expected.serial)
        if self.m_wanted == key:
            self.m_wanted = None

    # -- the caller's side, through the real engine -------------------------------

    def _read(self, key):
        """`ds[i]`: the batch, or the batch's error raised, as the dataset
        does with what `Prefetcher.get` returns."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the order warning, tested apart
            outcome = self.engine.get(key)
        self.last = key
        self.epoch = max(self.epoch, key[0])
        error = outcome.error
        if error is not None:
            name = error if isinstance(error, str) else type(error).__name__
            assert name in ERRORS, error
        return outcome

    # -- the simulated pool -----------------------------------------------------

    def _produce(self, key, error, original=None):
        self.produced += 1
        return Produced(key, next(self.serials), error, original=original)

    def _take_events(self):
        """`ProcessPool.take_events`."""
        events, self.pool_events = self.pool_events, []
        return events

    def _submit(self, worker, key):
        """`ProcessPool.submit`: only to a worker the pool has idle, with a
        key worth loading."""
        assert self.live.get(worker, "gone") is None, (worker, self.live)
        assert key not in self.live.values(), f"{key} sent twice"
        assert key not in self.m_arrived, f"{key} loaded again while waiting"
        assert self._m_keep(key), f"{key} is neither wanted nor in the window"
        self.live[worker] = key

    def _end(self, worker, restarts, countdown):
        """The worker is gone; the pool restarts it, or cannot yet."""
        del self.live[worker]
        if restarts:
            self.live[worker] = None
            self.pool_events.append(Joined(worker))
        else:
            self.vacant[worker] = countdown

    def _busy(self):
        return sorted(s for s, k in self.live.items() if k is not None)

    def _idle(self):
        return sorted(s for s, k in self.live.items() if k is None)

    def _arrive(self, worker, error):
        """A reply from `worker`, decoded as `ProcessPool._handle` does: an
        exception while decoding it is that batch's error."""
        key = self.live[worker]
        try:
            self._inject("decode")
        except BaseException as e:
            if not self._was_injected(e):
                raise
            error = type(e).__name__
        self.live[worker] = None
        self.pool_events.append(Arrived(worker, key, self._produce(key, error)))

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
            worker = data.draw(
                st.sampled_from([s for s, n in self.vacant.items() if not n])
            )
            del self.vacant[worker]
            self.live[worker] = None
            self.pool_events.append(Joined(worker))
            return True
        workers = self._idle() if what == "die idle" else self._busy()
        worker = data.draw(st.sampled_from(workers), label="worker")
        key = self.live[worker]
        if what == "arrive":
            self._arrive(worker, self._draw_error(data))
            return True
        # Died idle, or its reply never came (the key is sent again): None.
        outcome = self._produce(key, "WorkerDiedError") if what == "die" else None
        self.pool_events.append(Lost(worker, outcome))
        restarts = data.draw(st.booleans(), label="restarts")
        self._end(worker, restarts, data.draw(st.integers(1, 3)))
        return True

    def _draw_error(self, data):
        """No error, mostly; else a loader error of any class."""
        return data.draw(
            st.one_of(st.none(), st.none(), st.sampled_from(CLASS_NAMES)),
            label="loader error",
        )

    def _wait(self, block):
        """`ProcessPool.wait(0)` (block=False) or `wait()`: what it notices
        stays in `pool_events` until taken, even when it raises."""
        self._inject("wait")  # e.g. Ctrl-C in the blocking wait
        if block:
            self.waits += 1
            assert self.waits <= WILD_WAITS + CALM_WAITS, "a read waits forever"
            # After a few wild waits the pool calms down: every read ends.
            self.calm = self.calm or self.waits > WILD_WAITS
        for worker in self.vacant:  # time passes
            self.vacant[worker] = max(0, self.vacant[worker] - 1)
        if self.calm:
            self._calm_wait()
            return
        if block and not self._busy() and self.vacant:
            # Nothing in flight: the real wait sleeps until a retry is due.
            for worker in self.vacant:
                self.vacant[worker] = 0
        if not block and not self._busy() and not self.vacant:
            return
        # wait() returns at once with nothing if nothing is in flight and no
        # worker is vacant; the caller's loop would then spin.
        least = 1 if block else 0
        for _ in range(self.data.draw(st.integers(least, 3), label="events")):
            if not self._happen(self.data):
                break
        self._inject("wait")  # e.g. Ctrl-C delivered once the state is kept

    def _calm_wait(self):
        """A wait in which every busy worker delivers, every worker restarts."""
        for worker in self._busy():
            key = self.live[worker]
            self.live[worker] = None
            self.pool_events.append(Arrived(worker, key, self._produce(key, None)))
        for worker in sorted(self.vacant):
            del self.vacant[worker]
            self.live[worker] = None
            self.pool_events.append(Joined(worker))

    # -- checks -----------------------------------------------------------------

    def _unapplied(self):
        return [*self.engine._pending, *self.pool_events]

    def _check(self):
        # An exception between two events leaves the rest pending, and the
        # engine assigns only once it has applied them all.
        self.schedule.check(assigned=not self.engine._pending)
        assert set(self.schedule.arrived_keys()) == set(self.m_arrived)
        assert len(self.m_arrived) <= self.window + 1
        assert self.schedule.discarded == self.m_discarded
        assert self.schedule.wanted == self.m_wanted
        assert self.schedule.window_keys() == self._m_window()
        # The schedule and the pool agree on who loads what, once the
        # schedule has applied what it has not yet.
        # (Not its invariants: until the engine dispatches, a worker that
        # joined may be idle while the wanted key waits.)
        projected = self.schedule.plain()
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
        self.waits = 0

    @rule(data=st.data())
    def read(self, data):
        """`ds[i]`: ends with this key's outcome (a batch, or its error),
        or with the exception injected into the read, within a bounded
        number of waits: nothing waits forever, nothing spins."""
        self._step(data)
        self._glue(self._read, self._pick_key(data))

    @precondition(lambda self: any(k is not None for k in self.live.values()))
    @rule(data=st.data())
    def worker_finishes(self, data):
        self._step(data)
        self._arrive(data.draw(st.sampled_from(self._busy())), self._draw_error(data))

    @precondition(lambda self: any(k is not None for k in self.live.values()))
    @rule(data=st.data(), restarts=st.booleans(), countdown=st.integers(1, 3))
    def worker_dies_busy(self, data, restarts, countdown):
        self._step(data)
        worker = data.draw(st.sampled_from(self._busy()))
        key = self.live[worker]
        self.pool_events.append(Lost(worker, self._produce(key, "WorkerDiedError")))
        self._end(worker, restarts, countdown)

    @precondition(lambda self: any(k is not None for k in self.live.values()))
    @rule(data=st.data(), restarts=st.booleans(), countdown=st.integers(1, 3))
    def reply_interrupted(self, data, restarts, countdown):
        """The worker is lost without an outcome: its key is sent again."""
        self._step(data)
        worker = data.draw(st.sampled_from(self._busy()))
        self.pool_events.append(Lost(worker, None))
        self._end(worker, restarts, countdown)

    @precondition(lambda self: any(k is None for k in self.live.values()))
    @rule(data=st.data(), restarts=st.booleans(), countdown=st.integers(1, 3))
    def worker_dies_idle(self, data, restarts, countdown):
        self._step(data)
        worker = data.draw(st.sampled_from(self._idle()))
        self.pool_events.append(Lost(worker, None))
        self._end(worker, restarts, countdown)

    @precondition(lambda self: bool(self.vacant))
    @rule(data=st.data())
    def worker_joins(self, data):
        """A worker whose restart failed is started at a later try."""
        self._step(data)
        worker = data.draw(st.sampled_from(sorted(self.vacant)))
        del self.vacant[worker]
        self.live[worker] = None
        self.pool_events.append(Joined(worker))

    @rule(data=st.data())
    def epoch_change(self, data):
        """`on_epoch_end` / `set_epoch`: load from the new epoch's start."""
        self._step(data)
        epoch = data.draw(st.one_of(st.just(self.epoch + 1), st.integers(0, 4)))
        self.epoch = epoch
        self.last = None
        self._glue(self.engine.restart, epoch)

    @rule(data=st.data())
    def close(self, data):
        """The executor ends every worker; the engine goes with it."""
        self.calm = True
        self.engine.close()
        assert self.executor.closed
        # What the pool reported before it closed, and every worker lost.
        self.engine._apply(self._take_events())
        self.engine._apply([Lost(worker, None) for worker in sorted(self.live)])
        self.live.clear()
        self.vacant.clear()
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
