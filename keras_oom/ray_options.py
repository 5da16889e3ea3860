"""`RayExecutor`'s argument checks, and the small helpers around Ray.

What keras_oom/ray.py and keras_oom/ray_actors.py share without importing
Ray: the checks of `RayExecutor`'s arguments (each error names the
parameter and the value), Ray's import (imported only when an executor
starts), the setup's pickling for the actors, and the wording of Ray's
errors and resources in keras-oom's own errors.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from keras_oom.checks import as_index
from keras_oom.protocol import WorkerSetup, describe_error, safe_str

# Options the executor sets itself: it replaces lost actors (Ray must not
# restart them or retry their tasks) and runs one load at a time per actor.
OWN_OPTIONS = ("num_cpus", "max_restarts", "max_task_retries", "max_concurrency")


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            "keras_oom.ray.RayExecutor needs Ray: pip install 'keras-oom[ray]' "
            "(or pip install ray)."
        ) from e
    return ray


def pickle_setup(setup: WorkerSetup) -> bytes:
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


def one_line(e: BaseException) -> str:
    return " ".join(describe_error(e).split())


def format_resources(resources: dict[str, Any]) -> str:
    shown = {k: v for k, v in resources.items() if not k.startswith("node:")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def check_num_cpus(num_cpus: Any) -> float:
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


def check_in_flight(in_flight: Any) -> int:
    return as_index(in_flight, "in_flight", minimum=1, what="a positive integer")


def check_actor_options(actor_options: Any) -> dict[str, Any]:
    if actor_options is None:
        return {}
    if not isinstance(actor_options, dict):
        raise TypeError(
            f"`actor_options` must be a dict of ray.remote options or None. "
            f"Received: actor_options={actor_options!r}"
        )
    own = [k for k in OWN_OPTIONS if k in actor_options]
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


def check_start_timeout(start_timeout: Any) -> float:
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
