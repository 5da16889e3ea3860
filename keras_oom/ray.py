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
  each of its worker indexes reports `Lost`. A batch is a pure function of
  its ids and seed, so each of its loads is sent again (`Lost` without an
  outcome). Ray cannot say which one was running (it fails a finished
  load's ref too if the reply had not come back), so each then runs alone
  on its actor; a load lost alone was the one running, and lost alone a
  second time it ends with a `WorkerDiedError` naming the actor, the node
  and Ray's cause (ray_losses.py).
- A load outlives `timeout`: `ray.cancel` cannot interrupt an actor task,
  so the actor is killed (`ray.kill`) and the load ends with a
  `WorkerTimeoutError`; the loads queued behind it are sent again.
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
import threading
import time
from typing import Any

from keras_oom.errors import DatasetClosedError
from keras_oom.per_process import Owner
from keras_oom.protocol import Event, Load, WorkerSetup
from keras_oom.ray_actors import Actor, Pending, RayActors
from keras_oom.ray_options import (
    asked_resources,
    check_actor_options,
    check_in_flight,
    check_num_cpus,
    check_start_timeout,
    import_ray,
    pickle_setup,
    remote_options,
)

__all__ = ["RayExecutor"]

# How long one ray.wait() blocks before the waiter looks whether close()
# came from another thread: Ray's wait cannot be woken.
_SLICE = 0.1


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
        self.num_cpus = check_num_cpus(num_cpus)
        self.in_flight = check_in_flight(in_flight)
        self.actor_options = check_actor_options(actor_options)
        self.start_timeout = check_start_timeout(start_timeout)
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
        # The actors, their loads, deadlines and losses (ray_actors.py).
        asked = asked_resources(self.num_cpus, self.actor_options)
        self._actors = RayActors(self.in_flight, self.start_timeout, asked)
        self._closing = threading.Event()
        self._owner = Owner()
        self._local_node: str | None = None
        self.started_at = time.perf_counter()

    @property
    def retired_cpu_seconds(self) -> float:
        """CPU seconds of the actors that are gone."""
        return self._actors.retired_cpu_seconds

    @retired_cpu_seconds.setter
    def retired_cpu_seconds(self, value: float) -> None:
        self._actors.retired_cpu_seconds = value

    @property
    def _loads(self) -> dict[int, Pending]:
        # The loads in flight by worker index (tests/test_ray.py counts them).
        return self._actors.loads

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
        ray = import_ray()
        self.started_at = time.perf_counter()
        self._actors.begin(num_workers, timeout)
        try:
            if not ray.is_initialized():
                ray.init()  # as Ray's own APIs do at their first use
            self._ray = self._actors.ray = ray
            with contextlib.suppress(Exception):
                self._local_node = ray.get_runtime_context().get_node_id()
            self._setup_ref = ray.put(pickle_setup(setup))
            from keras_oom.ray_actor import LoaderActor

            self._remote = ray.remote(LoaderActor)
            self._actors.create = self._create
            for slot in range(num_workers):
                self._actors.fill(slot)
            self.raise_if_broken()
        except BaseException:
            self.close()  # no actor may outlive a start that raised
            raise

    def _create(self, slot: int) -> tuple[Any, Any]:
        """A new actor for `slot`, and the ref of its setup."""
        options = remote_options(self.num_cpus, self.actor_options)
        handle = self._remote.options(**options).remote()
        return handle, handle.setup.remote(self._setup_ref, slot)

    # -- requests -----------------------------------------------------------

    def submit(self, worker_index: int, load: Load) -> None:
        """Queues `load` on the actor of idle worker `worker_index`.

        Raises:
            DatasetClosedError: If the executor was closed.
            WorkerStartError: (or the error that broke it) If broken.
        """
        self._check_open()
        self.raise_if_broken()
        self._actors.send(worker_index, load)

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
        actors = self._actors
        actors.refill()
        if actors.events or not self.expecting():
            return
        ray = self._ray
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            limit = min(_SLICE, actors.next_deadline() - now)
            if end is not None:
                limit = min(limit, end - now)
            limit = max(0.0, limit)
            refs = [*actors.setups, *actors.by_ref]
            ready: list[Any] = []
            if refs:
                ready, rest = ray.wait(refs, num_returns=1, timeout=limit)
                if ready and rest:
                    ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            else:
                self._closing.wait(limit)
            self._check_open()  # close() from another thread wakes us up
            actors.handle(ready)
            actors.check_deadlines()
            actors.refill()
            if actors.restarts.broken is not None:
                self.raise_if_broken()
            if actors.events or not self.expecting():
                return
            if end is not None and time.monotonic() >= end:
                return

    def take_events(self) -> list[Event]:
        """The events since the last call, oldest first (kept until taken)."""
        events, self._actors.events = self._actors.events, []
        return events

    def expecting(self) -> bool:
        """Whether `wait()` has something to wait for: a load in flight, or
        an actor to replace."""
        return self._actors.expecting()

    def kill(self, worker_index: int) -> None:
        """Kills the actor of `worker_index` (`ray.kill`); each of its
        indexes is reported `Lost` at once, its running load with a
        `WorkerDiedError`, and a new actor takes its place."""
        self._actors.kill(worker_index)

    def raise_if_broken(self) -> None:
        """Raises what broke the executor: its own error once, then a
        `WorkerStartError` caused by it."""
        self._actors.restarts.raise_if_broken()

    def _check_open(self) -> None:
        if self._actors.closed:
            raise DatasetClosedError("The dataset's Ray executor was closed.")

    # -- observability and shutdown -----------------------------------------

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per worker index of a live actor: index, pid (on this node; 0
        elsewhere), batches and seconds loading, and an equal share of the
        actor's CPU seconds."""
        actors = self._actors
        out = []
        for actor in actors.slots.live():
            for index in actors.indexes(actor.slot):
                out.append(
                    {
                        "index": index,
                        "pid": self._local_pid(actor),
                        "batches": actors.batches.get(index, 0),
                        "busy_seconds": actors.busy_seconds.get(index, 0.0),
                        "cpu_seconds": actor.cpu_seconds / self.in_flight,
                    }
                )
        return out

    def _local_pid(self, actor: Actor) -> int:
        # A pid on another node means nothing here (stats read /proc).
        if actor.where.get("node_id") not in (None, self._local_node):
            return 0
        return actor.pid

    @property
    def pids(self) -> list[int]:
        """Per live actor, its process id on this node, or 0 (not started
        yet, or on another node)."""
        return [self._local_pid(a) for a in self._actors.slots.live()]

    @property
    def closed(self) -> bool:
        return self._actors.closed

    def close(self) -> None:
        """Kills every actor of this executor (`ray.kill`); idempotent, from
        any thread. Never shuts Ray down."""
        actors = self._actors.close()  # none if it was closed already
        self._closing.set()
        if not self._owner.here():
            return  # a fork of the owner: the actors are the owner's
        for actor in actors:
            self._actors.kill_handle(actor.handle)
