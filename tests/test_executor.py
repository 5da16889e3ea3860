"""The executor contract (keras_oom/executor.py), run against every executor.

Each test takes an unstarted executor from the `executor` fixture and checks
one clause of the contract through the interface alone: the local pool
(forked and fresh-interpreter workers) and Ray actors (`RayExecutor`, on
the session's local Ray instance; skipped, with the reason printed, where
Ray is not installed: `nox -s tests-ray` runs them).
"""

from __future__ import annotations

import functools
import sys
import threading
import time

import _procs
import _ray_loaders
import numpy as np
import pytest

from keras_oom import DatasetClosedError, WorkerDiedError
from keras_oom.executor import Executor, Slots
from keras_oom.process_pool import ProcessPool
from keras_oom.protocol import Arrived, Joined, Load, Lost, WorkerSetup, pack_ids

pytestmark = pytest.mark.timeout(60)

SETUP = WorkerSetup(_procs.ids_loader, None)


@pytest.fixture(autouse=True)
def no_leftover_workers():
    """conftest's check, where Ray's own processes (which Ray pools and
    reuses by itself) do not count, and no Ray actor may survive."""
    with _ray_loaders.no_leftovers():
        yield


@pytest.fixture(params=["fork", "subprocess", "ray"])
def executor(request):
    """An unstarted executor; closed after the test, whatever happens."""
    if request.param == "ray":
        _ray_loaders.start_ray()
        from keras_oom.ray import RayExecutor

        made = RayExecutor(num_cpus=0.25, in_flight=1)
    else:
        ray = sys.modules.get("ray")
        if request.param == "fork" and ray is not None and ray.is_initialized():
            pytest.skip(
                "a fork of a process that runs a Ray driver hangs the driver's "
                "gRPC calls (docs/distributed.md): run the Ray tests on their "
                "own, as `nox -s tests-ray` does"
            )
        made = ProcessPool(request.param)
    yield made
    made.close()


def load(key, ids):
    return Load(key, pack_ids(np.asarray(ids)), [], (0, key[0], key[1]), ())


def events_until(executor, done, seconds=30.0):
    """Waits on `executor` until `done(events)`, with a deadline; returns
    every event taken meanwhile."""
    events: list = []
    deadline = time.monotonic() + seconds
    while not done(events):
        left = deadline - time.monotonic()
        assert left > 0, f"no such events within {seconds} s: {events}"
        executor.wait(min(left, 1.0))
        events += executor.take_events()
    return events


def joined(events):
    return sorted(e.worker_index for e in events if isinstance(e, Joined))


def test_the_local_pool_implements_the_interface(executor):
    assert isinstance(executor, Executor)


def test_start_reports_one_joined_per_worker_index(executor):
    executor.start(SETUP, 3)
    events = executor.take_events()
    assert joined(events) == [0, 1, 2]
    assert len(executor.pids) == 3
    assert [w["index"] for w in executor.worker_stats()] == [0, 1, 2]


def test_each_submitted_load_ends_in_exactly_one_arrived(executor):
    executor.start(SETUP, 2)
    executor.take_events()
    executor.submit(0, load((0, 0), [1, 2]))
    executor.submit(1, load((0, 1), [3]))
    events = events_until(
        executor, lambda ev: len([e for e in ev if isinstance(e, Arrived)]) == 2
    )
    arrived = {e.worker_index: e for e in events if isinstance(e, Arrived)}
    assert arrived[0].key == (0, 0) and arrived[1].key == (0, 1)
    np.testing.assert_array_equal(arrived[0].outcome.value["n"], [7, 14])
    np.testing.assert_array_equal(arrived[1].outcome.value["n"], [21])
    assert not executor.expecting()  # nothing in flight: wait() returns at once
    executor.wait()
    assert executor.take_events() == []


def test_a_killed_busy_worker_ends_its_load_in_lost_and_is_restarted(executor):
    stuck = functools.partial(_procs.faulty_loader, actions={1: "sleep"})
    executor.start(WorkerSetup(stuck, None), 1)
    executor.take_events()
    executor.submit(0, load((0, 0), [0]))  # a first batch: the worker serves
    events_until(executor, lambda ev: any(isinstance(e, Arrived) for e in ev))
    executor.submit(0, load((0, 1), [1]))  # loads for a minute
    executor.kill(0)
    events = events_until(executor, lambda ev: any(isinstance(e, Joined) for e in ev))
    assert [type(e) for e in events] == [Lost, Joined], events
    assert isinstance(events[0].outcome.error, WorkerDiedError)
    assert events[0].worker_index == events[1].worker_index == 0


def test_close_from_another_thread_wakes_a_waiter_with_dataset_closed(executor):
    stuck = functools.partial(_procs.faulty_loader, actions={1: "sleep"})
    executor.start(WorkerSetup(stuck, None), 1)
    executor.take_events()
    executor.submit(0, load((0, 0), [1]))  # loads for a minute
    executor.take_events()
    errors: list[BaseException] = []
    waiting = threading.Event()

    def waiter():
        waiting.set()
        try:
            while True:
                executor.wait()
                executor.take_events()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert waiting.wait(10)
    executor.close()
    thread.join(10)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], DatasetClosedError), errors


def test_close_is_idempotent_and_ends_every_worker(executor):
    executor.start(SETUP, 2)
    executor.take_events()
    executor.submit(0, load((0, 0), [1]))
    executor.submit(1, load((0, 1), [2]))  # both serving: their pids are known
    events_until(
        executor, lambda ev: len([e for e in ev if isinstance(e, Arrived)]) == 2
    )
    pids = executor.pids
    executor.close()
    executor.close()
    assert executor.closed and executor.pids == []
    assert len(pids) == 2 and 0 not in pids
    assert _procs.wait_gone(pids, timeout=10) == []


def test_slots_let_exactly_one_taker_end_each_worker():
    """Kind: shared bookkeeping. Both executors keep their live workers in
    `Slots`: a worker taken out by its owner (a loss) is not handed to
    `close()` again, `close()` hands over the rest once, and a worker
    started after `close()` is refused, for its starter to end."""
    slots: Slots[str] = Slots()
    slots.resize(3)
    assert slots.put(0, "a") and slots.put(2, "c")
    assert list(slots) == ["a", None, "c"] and slots.live() == ["a", "c"]
    assert slots.take(0, "a")
    assert not slots.take(0, "a")  # taken already: the first taker ends it
    assert not slots.take(2, "other")  # not the worker in that slot
    assert slots.close() == ["c"]
    assert slots.closed and slots.live() == []
    assert slots.close() == []  # idempotent: nothing handed over twice
    assert not slots.put(1, "late")
    assert not slots.take(2, "c")  # close() took it
