"""Helpers for the Ray tests: one local Ray instance per session, checks
that no actor or process outlives a test, and loaders for the actors.

Imported by tests/test_ray.py and tests/test_executor.py, which skip their
Ray tests, with the reason printed, where Ray is not installed (the default
test sessions); `nox -s tests-ray` installs it.

Loaders live here, at module level, so that Ray's worker processes import
them by reference: the Ray instance is started with this directory on
their PYTHONPATH. Free of pytest and Keras imports at module level, as
_procs.py: actors import this module.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent


# -- the session's Ray instance ---------------------------------------------


def ray_or_skip():
    """The `ray` module, or a skip naming why (not installed)."""
    import pytest

    return pytest.importorskip(
        "ray", reason="Ray is not installed: run `nox -s tests-ray`"
    )


def start_ray():
    """Starts the session's local Ray instance once: 2 CPUs, no dashboard.

    Its workers (the actors' processes) find this directory and the package
    through PYTHONPATH, which the raylet passes on to them.
    """
    ray = ray_or_skip()
    if not ray.is_initialized():
        import _procs

        paths = [_procs.package_root(), str(TESTS), os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    return ray


def ray_processes() -> set[int]:
    """Live descendants of this process that are Ray's (its daemons and
    its worker processes, which Ray pools and reuses on its own)."""
    import _procs

    return {p for p in _procs.descendants() if is_ray_process(p)}


def is_ray_process(pid: int) -> bool:
    import _procs

    line = _procs.cmdline(pid)
    return line.startswith("ray::") or f"{os.sep}ray{os.sep}" in line


def alive_actors(class_name: str = "LoaderActor") -> list[str]:
    """Ids of the live actors of `class_name`, as the GCS lists them."""
    import ray

    actors = ray._private.state.actors()
    return [
        actor_id
        for actor_id, info in actors.items()
        if info.get("State") != "DEAD" and class_name in str(info.get("ActorClassName"))
    ]


def wait_no_actors(timeout: float = 10.0) -> list[str]:
    """Waits until no LoaderActor lives; returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        left = alive_actors()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@contextlib.contextmanager
def no_leftovers():
    """Fails if a LoaderActor, or a process that is not Ray's, survives."""
    import _procs

    before = _procs.worker_descendants()
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        left = wait_no_actors()
        assert not left, f"Ray actors survived the test: {left}"
    deadline = time.monotonic() + 2.0
    while True:
        new = {p for p in _procs.worker_descendants() - before if not is_ray_process(p)}
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not new, f"processes survived the test: {new}"


# -- loaders ------------------------------------------------------------------


def rng_loader(ids, rng):
    """Ids, a draw from `rng` and one from each global generator."""
    import random

    ids = np.asarray(ids)
    return {
        "x": ids.astype(np.float32)[:, None] * np.arange(1, 3, dtype=np.float32),
        "noise": rng.random(len(ids)),
        "legacy": np.random.random(len(ids)),
        "py": np.array([random.random() for _ in ids]),
    }


def plain_rng_loader(ids, rng):
    """Only `rng`: the same in LoaderDataset as in workers."""
    ids = np.asarray(ids)
    return ids.astype(np.float64) + rng.random(len(ids))


def pid_loader(ids):
    """The pid of the process that loaded each sample."""
    return np.full(len(ids), os.getpid(), np.int64)


def slow_loader(ids, seconds=0.05):
    time.sleep(seconds)
    return np.asarray(ids) * 2


def big_loader(ids, mib=2):
    """`mib` MiB per batch, each row filled with its id."""
    ids = np.asarray(ids)
    row = (mib << 20) // 8 // max(1, len(ids))
    return np.ones((len(ids), row)) * ids[:, None]


class CountingInit:
    """A worker_init that records `(index, pid)` in a file per call."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __call__(self, index: int) -> None:
        path = Path(self.directory) / f"{index}-{os.getpid()}-{time.time_ns()}"
        path.write_text(str(index))


def failing_init(index: int) -> None:
    raise KeyError(f"no database for worker {index}")


def die_on(ids, ids_to_die, marker_dir=None):
    """Kills its own process (os._exit) on a listed id; with `marker_dir`,
    only the first time per id (a marker file remembers)."""
    for i in np.asarray(ids):
        if int(i) in ids_to_die:
            if marker_dir is not None:
                marker = Path(marker_dir) / str(int(i))
                if marker.exists():
                    continue
                marker.write_text("died")
            os._exit(7)
    return np.asarray(ids) * 2


def exit_init(index: int) -> None:
    """A worker_init that ends its process: the actor dies while starting."""
    os._exit(3)


def slow_pid_loader(ids, seconds=0.05):
    """Ids times 2, and the pid of the process that loaded them."""
    time.sleep(seconds)
    ids = np.asarray(ids)
    return {"x": ids * 2, "pid": np.full(len(ids), os.getpid(), np.int64)}
