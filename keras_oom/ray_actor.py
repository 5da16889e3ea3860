"""The code a `RayExecutor`'s actors run: set up once, then build batches.

A plain class, wrapped with `ray.remote` by keras_oom/ray.py when an
executor starts, so that importing this module imports no Ray. It runs in
Ray's worker processes, on any node of the cluster: keras_oom must be
installed there (the same environment as the training process).

A batch is built by `worker.build_batch`, the local workers' own recipe
(seeds, ids, loader state, `rng`), so an actor's batch is the local
pool's, by construction. Every exception, of any class, is caught here and
sent back encoded (`protocol.encode_error`), as a local worker sends it: the
caller gets the loader's own exception with its frames, not Ray's
`RayTaskError`, and the actor lives on.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
from typing import Any

from keras_oom import seeding
from keras_oom import worker as worker_module
from keras_oom.protocol import ErrorPayload, Load, encode_error


class LoaderActor:
    """One remote worker: `setup` once, then one `load` per batch, in order.

    Ray runs an actor's tasks one at a time, in the order they were sent,
    so the loads queued behind the running one (`in_flight`) start as soon
    as it ends, and each sees the global generators reseeded for itself.
    """

    def __init__(self) -> None:
        # Nothing here may fail: a failure would be Ray's, with no traceback
        # of the loader; `setup` reports one.
        self._loader: Any = None
        self._wants_rng = False
        self._ready = False

    def setup(self, setup: bytes, index: int) -> tuple[str, dict[str, Any], Any]:
        """Unpickles the loader and runs `worker_init(index)`.

        Args:
            setup: The `WorkerSetup` pickled by value (cloudpickle).
            index: The actor's index in `range(num_workers)`.

        Returns:
            `("ready", where, None)` or `("failed", where, ErrorPayload)`,
            where `where` names the actor: `actor_id`, `node_id`, `ip`,
            `host`, `pid`.
        """
        where = _where()
        try:
            loader, worker_init = pickle.loads(setup)
            if not callable(loader):
                raise TypeError(f"loader is not callable: {loader!r}")
            worker_module._keep_large_allocations_on_heap()
            if worker_init is not None:
                worker_init(index)
        except BaseException as e:  # any class: the caller must hear why
            return "failed", where, encode_error(e)
        self._loader = loader
        self._wants_rng = seeding.accepts_rng(loader)
        self._ready = True
        return "ready", where, None

    def load(self, request: Load) -> tuple[Any, float, float, ErrorPayload | None]:
        """Builds batch `request.key`.

        Returns:
            `(value, seconds, cpu, error)`: the batch (None on error), the
            loader's wall time and this process's CPU time so far, in
            seconds, and the encoded error or None.
        """
        start = time.perf_counter()
        if not self._ready:  # queued behind a setup that failed
            error = RuntimeError("keras_oom: this actor's setup failed")
            return None, 0.0, time.process_time(), encode_error(error)
        try:
            value = worker_module.build_batch(self._loader, self._wants_rng, request)
        except BaseException as e:  # any class: that batch's error only
            seconds = time.perf_counter() - start
            return None, seconds, time.process_time(), encode_error(e)
        return value, time.perf_counter() - start, time.process_time(), None

    def ping(self) -> int:
        """This actor's pid: answers only while the actor lives."""
        return os.getpid()


def _where() -> dict[str, Any]:
    """Which actor, process and node this is, for messages."""
    import ray

    context = ray.get_runtime_context()
    try:
        ip = ray.util.get_node_ip_address()
    except Exception:
        ip = "?"
    return {
        "actor_id": context.get_actor_id() or "?",
        "node_id": context.get_node_id() or "?",
        "ip": ip,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
