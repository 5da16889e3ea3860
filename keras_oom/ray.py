"""`RayExecutor`: the same dataset's loader, in Ray actors across a cluster.

An executor (executor.py) whose workers are Ray actors, for when the
training host has too few cores to load fast enough: the loader runs on
other machines' CPUs, and each batch comes back through Ray's object store
(zero-copy, read-only arrays). Ray is imported only when an executor
starts; `import keras_oom` never imports it. See docs/distributed.md.

    engine (engine.py)                          Ray actor (ray_actor.py)
      | worker index w -> actor w // in_flight   |
      v                                          |
    RayExecutor.submit(w, Load) -- actor task --> worker.build_batch
      | in_flight loads queued per actor,        |   (the local workers'
      | run one at a time, in order              |    recipe of a batch)
      v                                          |
    wait(): ray.wait over every load and setup   |
      Arrived(w, key, Outcome) <------------- (value, seconds, cpu, error)
      Lost(w, Outcome | None)    actor or node gone, or `timeout`
      Joined(w)                  actor created (loads queue behind setup)

How each failure ends (the contract's, as the local pool's):

- The loader raises: the actor catches it and sends it back encoded, so the
  caller raises the loader's own exception with its frames and the ids in
  its notes, naming the actor and its node; the actor serves on.
- The actor or its node is lost (a crash, the OOM killer, a node removed):
  each of its worker indexes reports `Lost`. The batch it was running is
  a pure function of its ids and seed, so it is sent again (`Lost` without
  an outcome) the first time; lost a second time, it ends with a
  `WorkerDiedError` naming the actor, the node and Ray's cause. The loads
  queued behind it never started: they are sent again.
- A load outlives `timeout`: `ray.cancel` cannot interrupt an actor task,
  so the actor is killed (`ray.kill`) and the load ends with a
  `WorkerTimeoutError`.
- A lost actor is replaced under the same worker indexes, at once after a
  loss, with the local pool's pause after a failed start (`RETRY_PAUSE`,
  doubled); `MAX_START_FAILURES` failed starts in a row, or a `worker_init`
  that raised, break the executor.
- An actor that is not running its setup within `start_timeout` seconds
  (Ray waits forever for free CPUs) breaks the executor with a
  `WorkerStartError` naming the resources asked for and those available.
- `close()` (and the dataset's `with`, and its garbage collection) kills
  this executor's actors, never `ray.shutdown()`; the actors are owned by
  this process, so Ray ends them too if it dies.

At most `num_workers * in_flight` loads are in flight (one per worker
index), and the engine's window keeps at most that many loaded ahead.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import threading
import time
from typing import Any, NamedTuple

from keras_oom.errors import (
    DatasetClosedError,
    WorkerDiedError,
    WorkerStartError,
    WorkerTimeoutError,
)
from keras_oom.protocol import (
    Arrived,
    Event,
    Joined,
    Load,
    Lost,
    Outcome,
    WorkerSetup,
    add_note,
    decode_error,
    describe_error,
    safe_str,
)
from keras_oom.restarts import Restarts

__all__ = ["RayExecutor"]

# How long one ray.wait() blocks before the waiter looks whether close()
# came from another thread: Ray's wait cannot be woken.
_SLICE = 0.1
# Options the executor sets itself: it replaces lost actors (Ray must not
# restart them or retry their tasks) and runs one load at a time per actor.
_OWN_OPTIONS = ("num_cpus", "max_restarts", "max_task_retries", "max_concurrency")


class _Actor:
    """One remote worker: a Ray actor and what is queued on it."""

    def __init__(self, slot: int, handle: Any, setup_ref: Any) -> None:
        self.slot = slot
        self.handle = handle
        self.setup_ref = setup_ref
        self.created = time.monotonic()
        self.ready = False
        self.killed = False  # by kill(): its running load fails at once
        self.where: dict[str, Any] = {}
        with contextlib.suppress(Exception):  # a private attribute of Ray's
            self.where["actor_id"] = handle._actor_id.hex()
        self.queue: list[int] = []  # worker indexes with a load, as sent
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


class _Pending(NamedTuple):
    ref: Any
    key: Any
    actor: _Actor


class RayExecutor:
    """Runs a `PrefetchLoaderDataset`'s loader in Ray actors.

    Pass one as `executor=`: the dataset starts `num_workers` actors at its
    first use, each running the loader with `in_flight` batches queued, and
    yields exactly the batches it yields with its local pool (and
    `LoaderDataset`): the same order, shards, `rng` and reseeded global
    generators, `worker_init(index)` run once in each actor with its index
    in `range(num_workers)`. Results arrive through Ray's object store as
    read-only NumPy arrays, without a copy.

    If Ray is not initialised, the first start calls `ray.init()`, as Ray
    itself does at the first use of its remote API: it connects to the
    cluster in `RAY_ADDRESS` or started with `ray start`, else starts a
    local one. Ray must be installed (`pip install "keras-oom[ray]"`), and
    keras-oom and what the loader imports must be importable on every node.

    Args:
        num_cpus: CPUs Ray reserves for each actor (a number >= 0,
            fractions allowed). Ray places an actor only where that many
            are free.
        in_flight: Batches queued on each actor at once (an integer >= 1):
            the next ones start as soon as one ends, hiding the round trip.
            The dataset sees `num_workers * in_flight` worker indexes.
        actor_options: Other `ray.remote` options for the actors, as a
            dict (e.g. `{"resources": {"loader": 1}}`, `"memory"`,
            `"scheduling_strategy"`, `"runtime_env"`), or None. The
            executor sets `num_cpus`, `max_restarts`, `max_task_retries`
            and `max_concurrency` itself.
        start_timeout: Seconds an actor may take to be placed and run its
            setup (`worker_init` included) before the executor gives up
            with a `WorkerStartError`; Ray itself would wait forever for
            free CPUs.

    Raises:
        TypeError, ValueError: For a bad argument, naming it and its value.

    Example:

    ```python
    >>> import numpy as np
    >>> from keras_oom import PrefetchLoaderDataset
    >>> from keras_oom.ray import RayExecutor
    >>> def load(ids):
    ...     return ids * 10
    >>> with PrefetchLoaderDataset(
    ...         load, np.arange(6), batch_size=2, num_workers=2,
    ...         executor=RayExecutor(num_cpus=0.5, in_flight=2)) as ds:
    ...     [ds[i].tolist() for i in range(len(ds))]  # doctest: +SKIP
    [[0, 10], [20, 30], [40, 50]]

    ```
    """

    def __init__(
        self,
        num_cpus: float = 1,
        in_flight: int = 2,
        actor_options: dict[str, Any] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.num_cpus = _check_num_cpus(num_cpus)
        self.in_flight = _check_in_flight(in_flight)
        self.actor_options = _check_actor_options(actor_options)
        self.start_timeout = _check_start_timeout(start_timeout)
        self._reset()

    @property
    def loads_per_worker(self) -> int:
        """Worker indexes per actor (`in_flight`), read by the engine."""
        return self.in_flight

    def __repr__(self) -> str:
        return (
            f"RayExecutor(num_cpus={self.num_cpus}, in_flight={self.in_flight}, "
            f"actor_options={self.actor_options!r}, "
            f"start_timeout={self.start_timeout})"
        )

    # A copy (each dataset starts its own, copy.deepcopy) or a pickle of the
    # dataset carries the options only, never the actors.
    def __getstate__(self) -> dict[str, Any]:
        return {
            "num_cpus": self.num_cpus,
            "in_flight": self.in_flight,
            "actor_options": dict(self.actor_options),
            "start_timeout": self.start_timeout,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def _reset(self) -> None:
        self._ray: Any = None
        self._remote: Any = None  # the actor class, wrapped by ray.remote
        self._setup_ref: Any = None
        self._timeout: float | None = None
        self._closed = False
        # Failed starts per actor index, the pause before the next, and
        # what broke the executor: the local pool's own bookkeeping.
        self._restarts = Restarts()
        self._actors: list[_Actor | None] = []
        self._loads: dict[int, _Pending] = {}  # worker index -> its load
        self._setups: dict[Any, _Actor] = {}  # setup ref -> actor
        self._by_ref: dict[Any, int] = {}  # load ref -> worker index
        self._lost_once: set[Any] = set()  # keys already sent again once
        self._batches: dict[int, int] = {}
        self._busy_seconds: dict[int, float] = {}
        self._events: list[Event] = []
        self._state_lock = threading.Lock()
        self._closing = threading.Event()
        self._owner_pid = os.getpid()
        self._local_node: str | None = None
        self.retired_cpu_seconds = 0.0
        self.started_at = time.perf_counter()

    # -- starting actors ----------------------------------------------------

    def start(
        self, setup: WorkerSetup, num_workers: int, *, timeout: float | None = None
    ) -> None:
        """Starts `num_workers` actors; `Joined` for each of their indexes.

        Calls `ray.init()` first if Ray is not initialised.

        Raises:
            ImportError: If Ray is not installed.
            TypeError: If the loader or `worker_init` does not pickle.
            WorkerStartError: If no actor could be created. Either way the
                executor is closed then.
        """
        ray = _import_ray()
        self.started_at = time.perf_counter()
        self._timeout = timeout
        self._actors = [None] * num_workers
        self._restarts = Restarts(num_workers)
        try:
            if not ray.is_initialized():
                ray.init()  # as Ray's own APIs do at their first use
            self._ray = ray
            with contextlib.suppress(Exception):
                self._local_node = ray.get_runtime_context().get_node_id()
            self._setup_ref = ray.put(_pickle_setup(setup))
            from keras_oom.ray_actor import LoaderActor

            self._remote = ray.remote(LoaderActor)
            for slot in range(num_workers):
                self._fill(slot)
            self.raise_if_broken()
        except BaseException:
            self.close()  # no actor may outlive a start that raised
            raise

    def _options(self) -> dict[str, Any]:
        return {
            **self.actor_options,
            "num_cpus": self.num_cpus,
            "max_restarts": 0,
            "max_task_retries": 0,
            "max_concurrency": 1,
        }

    def _fill(self, slot: int) -> None:
        """Creates the actor of `slot`; its indexes join at once (their
        loads queue behind its setup)."""
        if self._closed or self._restarts.broken is not None:
            return
        try:
            handle = self._remote.options(**self._options()).remote()
            setup_ref = handle.setup.remote(self._setup_ref, slot)
        except Exception as e:
            self._restarts.failed(slot, e)
            return
        actor = _Actor(slot, handle, setup_ref)
        with self._state_lock:
            accepted = not self._closed  # else closed from another thread
            if accepted:
                self._actors[slot] = actor
        if not accepted:
            self._kill_handle(handle)
            return
        self._setups[setup_ref] = actor
        self._events += [Joined(i) for i in self._indexes(slot)]

    def _indexes(self, slot: int) -> range:
        return range(slot * self.in_flight, (slot + 1) * self.in_flight)

    def _refill(self) -> None:
        for slot, actor in enumerate(self._actors):
            if actor is None and self._restarts.due(slot):
                self._fill(slot)

    # -- requests -----------------------------------------------------------

    def submit(self, worker_index: int, load: Load) -> None:
        """Queues `load` on the actor of idle worker `worker_index`.

        Raises:
            DatasetClosedError: If the executor was closed.
            WorkerStartError: (or the error that broke it) If broken.
        """
        self._check_open()
        self.raise_if_broken()
        actor = self._actors[worker_index // self.in_flight]
        assert actor is not None and worker_index not in self._loads, (
            f"worker {worker_index} is not idle"
        )
        try:
            ref = actor.handle.load.remote(load)
        except Exception as e:  # the handle is unusable: the actor is lost
            self._loads[worker_index] = _Pending(None, load.key, actor)
            actor.queue.append(worker_index)
            self._lose(actor, e)
            return
        self._loads[worker_index] = _Pending(ref, load.key, actor)
        self._by_ref[ref] = worker_index
        if not actor.queue:
            actor.head_since = time.monotonic()
        actor.queue.append(worker_index)

    def wait(self, timeout: float | None = None) -> None:
        """Waits until something happens, or `timeout` seconds pass.

        What happened is kept for `take_events()`; with events not yet
        taken, or nothing to wait for, it returns at once.

        Raises:
            DatasetClosedError: If closed, also from another thread meanwhile.
            WorkerStartError: (or the error that broke it) If broken.
        """
        self._check_open()
        self.raise_if_broken()
        self._refill()
        if self._events or not self.expecting():
            return
        ray = self._ray
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            limit = min(_SLICE, self._next_deadline() - now)
            if end is not None:
                limit = min(limit, end - now)
            limit = max(0.0, limit)
            refs = [*self._setups, *self._by_ref]
            ready: list[Any] = []
            if refs:
                ready, rest = ray.wait(refs, num_returns=1, timeout=limit)
                if ready and rest:
                    ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            else:
                self._closing.wait(limit)
            self._check_open()  # close() from another thread wakes us up
            self._handle(ready)
            self._check_deadlines()
            self._refill()
            if self._restarts.broken is not None:
                self.raise_if_broken()
            if self._events or not self.expecting():
                return
            if end is not None and time.monotonic() >= end:
                return

    def take_events(self) -> list[Event]:
        """The events since the last call, oldest first (kept until taken)."""
        events, self._events = self._events, []
        return events

    def expecting(self) -> bool:
        """Whether `wait()` has something to wait for: a load in flight, or
        an actor to replace."""
        return bool(self._loads) or any(a is None for a in self._actors)

    def kill(self, worker_index: int) -> None:
        """Kills the actor of `worker_index` (`ray.kill`); each of its
        indexes is reported `Lost` at once, its running load with a
        `WorkerDiedError`, and a new actor takes its place."""
        actor = self._actors[worker_index // self.in_flight]
        if actor is not None:
            actor.killed = True
            self._lose(actor, RuntimeError("killed by RayExecutor.kill()"))

    # -- what arrives -------------------------------------------------------

    def _handle(self, ready: list[Any]) -> None:
        """Applies every finished setup, then every finished load, each
        actor's in the order they were sent."""
        for ref in [r for r in ready if r in self._setups]:
            self._setup_done(ref)
        # After the setups: an actor lost while starting took its loads.
        loads = [r for r in ready if r in self._by_ref]

        def order(ref: Any) -> tuple[int, int]:
            pending = self._loads[self._by_ref[ref]]
            return pending.actor.slot, pending.actor.queue.index(self._by_ref[ref])

        for ref in sorted(loads, key=order):
            if ref in self._by_ref:  # not lost with its actor meanwhile
                self._load_done(ref)

    def _setup_done(self, ref: Any) -> None:
        actor = self._setups.pop(ref)
        ray = self._ray
        try:
            status, where, payload = ray.get(ref)
        except ray.exceptions.RayError as e:
            self._lose(actor, e)
            return
        actor.where.update(where)
        if status == "failed":
            error = decode_error(payload, f"{actor} while starting")
            add_note(error, "keras_oom: the Ray executor cannot start actors; broken")
            self._restarts.break_(error)
            return
        actor.ready = True
        actor.head_since = time.monotonic()  # `timeout` counts loading only
        self._restarts.started(actor.slot)

    def _load_done(self, ref: Any) -> None:
        ray = self._ray
        index = self._by_ref[ref]
        pending = self._loads[index]
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
            self._lose(actor, e)
            return
        error = None if payload is None else decode_error(payload, str(actor))
        actor.cpu_seconds = cpu
        self._batches[index] = self._batches.get(index, 0) + 1
        self._busy_seconds[index] = self._busy_seconds.get(index, 0.0) + seconds
        self._lost_once.discard(pending.key)
        self._arrive(index, Outcome(value, error, seconds, actor.pid))

    def _arrive(self, index: int, outcome: Outcome) -> None:
        pending = self._loads.pop(index)
        self._by_ref.pop(pending.ref, None)
        actor = pending.actor
        actor.queue.remove(index)
        actor.head_since = time.monotonic()
        self._events.append(Arrived(index, pending.key, outcome))

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for actor in list(self._actors):
            if actor is None or self._actors[actor.slot] is not actor:
                continue
            if not actor.ready:
                if now >= actor.created + self.start_timeout:
                    self._restarts.break_(self._unschedulable(actor))
            elif (
                self._timeout is not None
                and actor.queue
                and now >= actor.head_since + self._timeout
            ):
                self._lose(actor, None, timed_out=actor.queue[0])

    def _next_deadline(self) -> float:
        """The nearest moment `wait` must act without Ray telling it."""
        deadlines = [math.inf]
        for slot, actor in enumerate(self._actors):
            if actor is None:
                deadlines.append(time.monotonic() + self._restarts.seconds_until(slot))
            elif not actor.ready:
                deadlines.append(actor.created + self.start_timeout)
            elif self._timeout is not None and actor.queue:
                deadlines.append(actor.head_since + self._timeout)
        return min(deadlines)

    def _unschedulable(self, actor: _Actor) -> WorkerStartError:
        ray = self._ray
        asked = {"CPU": self.num_cpus, **self.actor_options.get("resources", {})}
        if "num_gpus" in self.actor_options:
            asked["GPU"] = self.actor_options["num_gpus"]
        try:
            available = ray.available_resources()
            total = ray.cluster_resources()
            have = (
                f"available now: {_resources(available)}; in the cluster: "
                f"{_resources(total)}"
            )
        except Exception as e:
            have = f"the cluster's resources could not be read ({describe_error(e)})"
        return WorkerStartError(
            f"keras_oom's {actor} did not start within start_timeout="
            f"{self.start_timeout}s: Ray could not place it, or its setup "
            f"(worker_init) did not finish. Each actor asks for "
            f"{_resources(asked)}; {have}. Add nodes or CPUs, lower "
            f"num_cpus or num_workers, or raise start_timeout."
        )

    def _lose(
        self,
        actor: _Actor,
        cause: BaseException | None,
        *,
        timed_out: int | None = None,
    ) -> None:
        """Ends `actor`: each of its indexes is `Lost`, then it is replaced."""
        with self._state_lock:
            mine = self._actors[actor.slot] is actor
            if mine:
                self._actors[actor.slot] = None
        if not mine:
            return  # closed meanwhile: the caller gets DatasetClosedError
        self._kill_handle(actor.handle)
        self._setups.pop(actor.setup_ref, None)
        head = actor.queue[0] if actor.queue else None
        for index in self._indexes(actor.slot):
            pending = self._loads.pop(index, None)
            if pending is not None:
                self._by_ref.pop(pending.ref, None)
            outcome = None
            if pending is not None and self._restarts.broken is None:
                outcome = self._loss_outcome(
                    actor, pending, index, head, cause, timed_out
                )
            self._events.append(Lost(index, outcome))
        self.retired_cpu_seconds += actor.cpu_seconds
        if not actor.ready and timed_out is None and not actor.killed:
            self._restarts.failed(actor.slot, cause or RuntimeError("lost"))
        if self._restarts.due(actor.slot):
            self._fill(actor.slot)

    def _loss_outcome(
        self,
        actor: _Actor,
        pending: _Pending,
        index: int,
        head: int | None,
        cause: BaseException | None,
        timed_out: int | None,
    ) -> Outcome | None:
        """The error that ends `pending`, or None: send it again."""
        if index == timed_out:
            return Outcome(
                error=WorkerTimeoutError(
                    f"keras_oom's {actor} took longer than timeout="
                    f"{self._timeout}s on one batch and was killed (ray.kill)."
                ),
                pid=actor.pid,
            )
        if not actor.ready or index != head:
            return None  # it never started
        if not actor.killed and pending.key not in self._lost_once:
            self._lost_once.add(pending.key)  # a pure function: run it again
            return None
        again = "" if actor.killed else " a second time"
        why = "" if cause is None else f" Ray says: {_one_line(cause)}"
        return Outcome(
            error=WorkerDiedError(
                f"keras_oom's {actor} was lost{again} while loading a batch.{why}",
                pid=actor.pid,
                exitcode=None,
                batch_index=None,
            ),
            pid=actor.pid,
        )

    def _kill_handle(self, handle: Any) -> None:
        with contextlib.suppress(Exception):  # already dead, or Ray shut down
            self._ray.kill(handle, no_restart=True)

    def raise_if_broken(self) -> None:
        """Raises what broke the executor: its own error once, then a
        `WorkerStartError` caused by it."""
        self._restarts.raise_if_broken()

    def _check_open(self) -> None:
        if self._closed:
            raise DatasetClosedError("The dataset's Ray executor was closed.")

    # -- observability and shutdown -----------------------------------------

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per worker index of a live actor: index, pid (on this node; 0
        elsewhere), batches and seconds loading, and an equal share of the
        actor's CPU seconds."""
        out = []
        for actor in self._actors:
            if actor is None:
                continue
            for index in self._indexes(actor.slot):
                out.append(
                    {
                        "index": index,
                        "pid": self._local_pid(actor),
                        "batches": self._batches.get(index, 0),
                        "busy_seconds": self._busy_seconds.get(index, 0.0),
                        "cpu_seconds": actor.cpu_seconds / self.in_flight,
                    }
                )
        return out

    def _local_pid(self, actor: _Actor) -> int:
        # A pid on another node means nothing here (stats read /proc).
        if actor.where.get("node_id") not in (None, self._local_node):
            return 0
        return actor.pid

    @property
    def pids(self) -> list[int]:
        """Per live actor, its process id on this node, or 0 (not started
        yet, or on another node)."""
        return [self._local_pid(a) for a in self._actors if a is not None]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Kills every actor of this executor (`ray.kill`); idempotent, from
        any thread. Never shuts Ray down."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            actors = [a for a in self._actors if a is not None]
            self._actors = [None] * len(self._actors)
        self._closing.set()
        if os.getpid() != self._owner_pid:
            return  # a fork of the owner: the actors are the owner's
        for actor in actors:
            self._kill_handle(actor.handle)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            "keras_oom.ray.RayExecutor needs Ray: pip install 'keras-oom[ray]' "
            "(or pip install ray)."
        ) from e
    return ray


def _pickle_setup(setup: WorkerSetup) -> bytes:
    from keras_oom.launch import _dumps_naming_files

    try:
        return _dumps_naming_files(setup)
    except Exception as e:
        raise TypeError(
            f"The loader {setup.loader!r} (or worker_init) cannot be pickled "
            f"with cloudpickle, which RayExecutor needs to send it to its "
            f"actors ({type(e).__name__}: {safe_str(e)}). Make it picklable: "
            f"open files, connections and locks in each actor instead, in "
            f"`worker_init` or lazily on the loader's first call."
        ) from e


def _one_line(e: BaseException) -> str:
    return " ".join(describe_error(e).split())


def _resources(resources: dict[str, Any]) -> str:
    shown = {k: v for k, v in resources.items() if not k.startswith("node:")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def _check_num_cpus(num_cpus: Any) -> float:
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, numbers.Real):
        raise TypeError(
            f"`num_cpus` must be a number of CPUs per actor. "
            f"Received: num_cpus={num_cpus!r} of type {type(num_cpus).__name__}"
        )
    value = float(num_cpus)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(
            f"`num_cpus` must be a finite number >= 0. Received: num_cpus={num_cpus}"
        )
    return value


def _check_in_flight(in_flight: Any) -> int:
    from keras_oom.checks import as_index

    return as_index(in_flight, "in_flight", minimum=1, what="a positive integer")


def _check_actor_options(actor_options: Any) -> dict[str, Any]:
    if actor_options is None:
        return {}
    if not isinstance(actor_options, dict):
        raise TypeError(
            f"`actor_options` must be a dict of ray.remote options or None. "
            f"Received: actor_options={actor_options!r}"
        )
    own = [k for k in _OWN_OPTIONS if k in actor_options]
    if own:
        raise ValueError(
            f"`actor_options` must not set {own}: RayExecutor sets them (pass "
            f"num_cpus= itself; it replaces lost actors, so Ray must not "
            f"restart them). Received: actor_options={actor_options!r}"
        )
    if actor_options.get("lifetime") == "detached":
        raise ValueError(
            "`actor_options` must not make the actors detached: they would "
            "outlive the training process. Received: "
            f"actor_options={actor_options!r}"
        )
    return dict(actor_options)


def _check_start_timeout(start_timeout: Any) -> float:
    if isinstance(start_timeout, bool) or not isinstance(start_timeout, numbers.Real):
        raise TypeError(
            f"`start_timeout` must be a number of seconds. Received: "
            f"start_timeout={start_timeout!r} of type {type(start_timeout).__name__}"
        )
    value = float(start_timeout)
    if not value > 0:  # also NaN
        raise ValueError(
            f"`start_timeout` must be positive. Received: start_timeout={start_timeout}"
        )
    return value
