"""`RayExecutor`'s argument checks, and the small helpers around Ray.

What keras_oom/ray.py and keras_oom/ray_actors.py share without importing
Ray: the checks of `RayExecutor`'s arguments (each error names the
parameter and the value), Ray's import (imported only when an executor
starts), the setup's pickling for the actors, the actors' options and the
resources they ask for, and the wording of Ray's errors and resources in
keras-oom's own errors (an actor Ray cannot place).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from keras_oom.checks import as_index
from keras_oom.errors import WorkerStartError
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


def unschedulable_error(
    ray: Any, actor: str, start_timeout: float, asked: dict[str, Any]
) -> WorkerStartError:
    """Why `actor` (its name) did not start within `start_timeout` seconds:
    the resources it asked for, and those Ray has now."""
    try:
        available = ray.available_resources()
        total = ray.cluster_resources()
        have = (
            f"available now: {format_resources(available)}; in the cluster: "
            f"{format_resources(total)}"
        )
    except Exception as e:
        have = f"the cluster's resources could not be read ({describe_error(e)})"
    return WorkerStartError(
        f"keras_oom's {actor} did not start within start_timeout="
        f"{start_timeout}s: Ray could not place it, or its setup "
        f"(worker_init) did not finish. Each actor asks for "
        f"{format_resources(asked)}; {have}. Add nodes or CPUs, lower "
        f"num_cpus or num_workers, or raise start_timeout."
    )


def asked_resources(num_cpus: float, actor_options: dict[str, Any]) -> dict[str, Any]:
    """The resources each actor asks Ray for, as Ray names them."""
    asked = {"CPU": num_cpus, **actor_options.get("resources", {})}
    if "num_gpus" in actor_options:
        asked["GPU"] = actor_options["num_gpus"]
    return asked


def remote_options(num_cpus: float, actor_options: dict[str, Any]) -> dict[str, Any]:
    """The actors' `ray.remote` options: the user's, and `OWN_OPTIONS`."""
    return {
        **actor_options,
        "num_cpus": num_cpus,
        "max_restarts": 0,
        "max_task_retries": 0,
        "max_concurrency": 1,
    }


def _as_real(value: Any, name: str, what: str) -> float:
    """`value` as a float, or a `TypeError` naming `name` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be {what}. Received: {name}={value!r} "
            f"of type {type(value).__name__}"
        )
    return float(value)


def check_num_cpus(num_cpus: Any) -> float:
    value = _as_real(num_cpus, "num_cpus", "a number of CPUs per actor")
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
    value = _as_real(start_timeout, "start_timeout", "a number of seconds")
    if not value > 0:  # also NaN
        raise ValueError(
            f"`start_timeout` must be positive. Received: start_timeout={start_timeout}"
        )
    return value
