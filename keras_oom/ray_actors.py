"""`RayExecutor`'s bookkeeping: its actors, their loads, and how each ends.

Which Ray actor serves which worker indexes (actor `slot` serves
`slot * in_flight` to `(slot + 1) * in_flight - 1`), the loads queued on
each in the order they were sent, their deadlines (`start_timeout` while
an actor starts, `timeout` for the load at the head of its queue), and
the wording of each way one ends: the loader's error, a lost actor (sent
again once, alone, then a `WorkerDiedError`: ray_losses.py says which load
a loss is charged to), a `WorkerTimeoutError`, an actor Ray cannot place
(`WorkerStartError`, worded in ray_options.py). A load the engine submits
is held back here while its actor must run a suspect alone. Its
actors are held in `executor.Slots`, as the local pool holds its
processes. `RayActors` never blocks:
`RayExecutor.wait` (keras_oom/ray.py) waits on Ray and hands it what is
ready; the module docstring there says how each failure ends.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from keras_oom.executor import Slots
from keras_oom.protocol import (
    Arrived,
    Event,
    Joined,
    Load,
    Lost,
    Outcome,
    add_note,
    decode_error,
)
from keras_oom.ray_losses import Losses
from keras_oom.ray_options import unschedulable_error
from keras_oom.restarts import Restarts


class Actor:
    """One remote worker: a Ray actor and what is queued on it."""

    def __init__(self, slot: int, handle: Any, setup_ref: Any) -> None:
        self.slot = slot
        self.handle = handle
        self.setup_ref = setup_ref
        self.created = time.monotonic()
        self.ready = False
        self.killed = False  # by kill(): its running load fails at once
        self.failing = False  # a load of it failed with it: send no more
        self.where: dict[str, Any] = {}
        with contextlib.suppress(Exception):  # a private attribute of Ray's
            self.where["actor_id"] = handle._actor_id.hex()
        self.queue: list[int] = []  # worker indexes with a load, as sent
        self.held: list[tuple[int, Load]] = []  # submitted, not yet sent
        self.head_since = self.created  # when the first of them began
        self.cpu_seconds = 0.0

    @property
    def pid(self) -> int:
        return int(self.where.get("pid", 0))

    def __str__(self) -> str:
        w = self.where
        pid = f", pid {w['pid']}" if "pid" in w else ""
        node = (
            f" on node {w.get('ip', '?')} ({w.get('host', '?')}, "
            f"node id {str(w.get('node_id', '?'))[:12]})"
            if "node_id" in w
            else " (not started yet)"
        )
        return f"Ray actor {w.get('actor_id', '?')} (worker {self.slot}{pid}){node}"


class Pending(NamedTuple):
    ref: Any  # None while held back (or if the handle refused it)
    key: Any
    actor: Actor


class RayActors:
    """The actors of one `RayExecutor` and the loads in flight on them.

    Built unstarted; `begin` sizes it and `fill` creates each actor through
    `create(slot) -> (handle, setup_ref)`. What happens is appended to
    `events` for the executor's `take_events()`.

    Args:
        in_flight: Worker indexes per actor.
        start_timeout: Seconds an actor may take to run its setup.
        asked: The resources each actor asks Ray for (`{"CPU": 1, ...}`),
            named when Ray cannot place one.
    """

    def __init__(
        self, in_flight: int, start_timeout: float, asked: dict[str, Any]
    ) -> None:
        self.in_flight = in_flight
        self.start_timeout = start_timeout
        self.asked = asked
        self.ray: Any = None
        self.create: Callable[[int], tuple[Any, Any]] | None = None
        self.timeout: float | None = None
        # Failed starts per actor index, the pause before the next, and
        # what broke the executor: the local pool's own bookkeeping.
        self.restarts = Restarts()
        # Each actor slot's live actor; whoever takes one out kills it.
        self.slots: Slots[Actor] = Slots()
        self.loads: dict[int, Pending] = {}  # worker index -> its load
        self.setups: dict[Any, Actor] = {}  # setup ref -> actor
        self.by_ref: dict[Any, int] = {}  # load ref -> worker index
        self.losses = Losses()  # suspects, and what a loss is charged
        self.batches: dict[int, int] = {}
        self.busy_seconds: dict[int, float] = {}
        self.events: list[Event] = []
        self.retired_cpu_seconds = 0.0

    @property
    def closed(self) -> bool:
        return self.slots.closed

    def begin(self, num_workers: int, timeout: float | None) -> None:
        """Sizes the table for `num_workers` actors, none created yet."""
        self.timeout = timeout
        self.slots.resize(num_workers)
        self.restarts = Restarts(num_workers)

    # -- actors -------------------------------------------------------------

    def fill(self, slot: int) -> None:
        """Creates the actor of `slot`; its indexes join at once (their
        loads queue behind its setup)."""
        if self.closed or self.restarts.broken is not None:
            return
        assert self.create is not None, "fill() before the executor started"
        try:
            handle, setup_ref = self.create(slot)
        except Exception as e:
            self.restarts.failed(slot, e)
            return
        actor = Actor(slot, handle, setup_ref)
        if not self.slots.put(slot, actor):
            self.kill_handle(handle)  # closed from another thread meanwhile
            return
        self.setups[setup_ref] = actor
        self.events += [Joined(i) for i in self.indexes(slot)]

    def indexes(self, slot: int) -> range:
        return range(slot * self.in_flight, (slot + 1) * self.in_flight)

    def refill(self) -> None:
        for slot, actor in enumerate(self.slots):
            if actor is None and self.restarts.due(slot):
                self.fill(slot)

    def send(self, worker_index: int, load: Load) -> None:
        """Queues `load` on the actor of idle worker `worker_index`."""
        actor = self.slots[worker_index // self.in_flight]
        assert actor is not None and worker_index not in self.loads, (
            f"worker {worker_index} is not idle"
        )
        self.loads[worker_index] = Pending(None, load.key, actor)
        actor.held.append((worker_index, load))
        self._release(actor)

    def _release(self, actor: Actor) -> None:
        """Sends `actor` its held loads, in order, but a suspect only to an
        actor with nothing queued, and nothing behind a suspect."""
        alone = self.losses.alone
        while actor.held and self.slots[actor.slot] is actor and not actor.failing:
            worker_index, load = actor.held[0]
            if actor.queue and (
                alone(load.key) or alone(self.loads[actor.queue[0]].key)
            ):
                return
            del actor.held[0]
            self._send_now(actor, worker_index, load)

    def _send_now(self, actor: Actor, worker_index: int, load: Load) -> None:
        try:
            ref = actor.handle.load.remote(load)
        except Exception as e:  # the handle is unusable: the actor is lost
            self.loads[worker_index] = Pending(None, load.key, actor)
            actor.queue.append(worker_index)
            self.lose(actor, e)
            return
        self.loads[worker_index] = Pending(ref, load.key, actor)
        self.by_ref[ref] = worker_index
        if not actor.queue:
            actor.head_since = time.monotonic()
        actor.queue.append(worker_index)

    def kill(self, worker_index: int) -> None:
        """Ends the actor of `worker_index` as `RayExecutor.kill` says."""
        actor = self.slots[worker_index // self.in_flight]
        if actor is not None:
            actor.killed = True
            self.lose(actor, RuntimeError("killed by RayExecutor.kill()"))

    def expecting(self) -> bool:
        return bool(self.loads) or any(a is None for a in self.slots)

    def close(self) -> list[Actor]:
        """Marks the table closed; the live actors, for the caller to kill
        (none if it was closed already)."""
        return self.slots.close()

    def kill_handle(self, handle: Any) -> None:
        with contextlib.suppress(Exception):  # already dead, or Ray shut down
            self.ray.kill(handle, no_restart=True)

    # -- what arrives -------------------------------------------------------

    def handle(self, ready: list[Any]) -> None:
        """Applies every finished setup, then every finished load, each
        actor's in the order they were sent."""
        for ref in [r for r in ready if r in self.setups]:
            self._setup_done(ref)
        # After the setups: an actor lost while starting took its loads.
        loads = [r for r in ready if r in self.by_ref]

        def order(ref: Any) -> tuple[int, int]:
            pending = self.loads[self.by_ref[ref]]
            return pending.actor.slot, pending.actor.queue.index(self.by_ref[ref])

        for ref in sorted(loads, key=order):
            if ref in self.by_ref:  # not lost with its actor meanwhile
                self._load_done(ref)
        for actor in self.slots.live():  # after every loss: see _settle_before
            self._release(actor)

    def _setup_done(self, ref: Any) -> None:
        actor = self.setups.pop(ref)
        ray = self.ray
        try:
            status, where, payload = ray.get(ref)
        except ray.exceptions.RayError as e:
            self.lose(actor, e)
            return
        actor.where.update(where)
        if status == "failed":
            error = decode_error(payload, f"{actor} while starting")
            add_note(error, "keras_oom: the Ray executor cannot start actors; broken")
            self.restarts.break_(error)
            return
        actor.ready = True
        actor.head_since = time.monotonic()  # `timeout` counts loading only
        self.restarts.started(actor.slot)

    def _load_done(self, ref: Any) -> None:
        ray = self.ray
        index = self.by_ref[ref]
        pending = self.loads[index]
        actor = pending.actor
        try:
            value, seconds, cpu, payload = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            # Not the loader's error (the actor catches those): Ray could
            # not store the batch (it does not serialise). That batch only.
            cause = getattr(e, "cause", None)
            error = cause if isinstance(cause, BaseException) else e
            add_note(error, f"keras_oom: Ray could not return the batch from {actor}")
            self._arrive(index, Outcome(error=error, pid=actor.pid))
            return
        except ray.exceptions.RayError as e:  # the actor or its node is gone
            actor.failing = True
            self._settle_before(actor, index)
            if self.slots[actor.slot] is actor:  # not lost while settling
                self.lose(actor, e)
            return
        error = None if payload is None else decode_error(payload, str(actor))
        actor.cpu_seconds = cpu
        self.batches[index] = self.batches.get(index, 0) + 1
        self.busy_seconds[index] = self.busy_seconds.get(index, 0.0) + seconds
        self.losses.arrived(pending.key)
        self._arrive(index, Outcome(value, error, seconds, actor.pid))

    def _settle_before(self, actor: Actor, index: int) -> None:
        """Applies the loads queued on `actor` before `index` whose results
        are already here, without waiting.

        Ray may report a later load's failure before an earlier load's
        result; applied first, a finished load is not run again. One not
        reported yet becomes a suspect and runs again, alone: sound, so
        nothing is worth blocking the waiter for (Ray may also fail a
        finished load's ref, so waiting would not make it arrive).
        """
        earlier = [self.loads[i].ref for i in actor.queue[: actor.queue.index(index)]]
        if not earlier:
            return
        ready, _ = self.ray.wait(earlier, num_returns=len(earlier), timeout=0)
        for ref in earlier:  # in the order they were sent
            if ref in ready and ref in self.by_ref:
                self._load_done(ref)

    def _arrive(self, index: int, outcome: Outcome) -> None:
        pending = self.loads.pop(index)
        self.by_ref.pop(pending.ref, None)
        actor = pending.actor
        actor.queue.remove(index)
        actor.head_since = time.monotonic()
        self.events.append(Arrived(index, pending.key, outcome))

    # -- deadlines and losses -----------------------------------------------

    def check_deadlines(self) -> None:
        now = time.monotonic()
        for actor in self.slots.live():
            if self.slots[actor.slot] is not actor:
                continue  # lost meanwhile, in this loop
            if not actor.ready:
                if now >= actor.created + self.start_timeout:
                    error = unschedulable_error(
                        self.ray, str(actor), self.start_timeout, self.asked
                    )
                    self.restarts.break_(error)
            elif (
                self.timeout is not None
                and actor.queue
                and now >= actor.head_since + self.timeout
            ):
                self.lose(actor, None, timed_out=actor.queue[0])

    def next_deadline(self) -> float:
        """The nearest moment `wait` must act without Ray telling it."""
        deadlines = [math.inf]
        for slot, actor in enumerate(self.slots):
            if actor is None:
                deadlines.append(time.monotonic() + self.restarts.seconds_until(slot))
            elif not actor.ready:
                deadlines.append(actor.created + self.start_timeout)
            elif self.timeout is not None and actor.queue:
                deadlines.append(actor.head_since + self.timeout)
        return min(deadlines)

    def lose(
        self,
        actor: Actor,
        cause: BaseException | None,
        *,
        timed_out: int | None = None,
    ) -> None:
        """Ends `actor`: each of its indexes is `Lost`, then it is replaced."""
        if not self.slots.take(actor.slot, actor):
            return  # closed meanwhile: the caller gets DatasetClosedError
        self.kill_handle(actor.handle)
        self.setups.pop(actor.setup_ref, None)
        actor.held.clear()
        head = actor.queue[0] if actor.queue else None
        for index in self.indexes(actor.slot):
            pending = self.loads.pop(index, None)
            if pending is not None:
                self.by_ref.pop(pending.ref, None)
            outcome = None
            if pending is not None and self.restarts.broken is None:
                charged = None  # lost on its own: every load sent a suspect
                if timed_out is not None or actor.killed:
                    killed = "timeout" if timed_out is not None else "killed"
                    charged = killed if index == head else "spared"
                outcome = self.losses.outcome(
                    str(actor),
                    actor.pid,
                    pending.key,
                    sent=pending.ref is not None,
                    started=actor.ready,
                    alone=len(actor.queue) == 1,
                    charged=charged,
                    cause=cause,
                    timeout=self.timeout,
                )
            self.events.append(Lost(index, outcome))
        self.retired_cpu_seconds += actor.cpu_seconds
        if not actor.ready and timed_out is None and not actor.killed:
            self.restarts.failed(actor.slot, cause or RuntimeError("lost"))
        if self.restarts.due(actor.slot):
            self.fill(actor.slot)
