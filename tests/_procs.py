"""Helpers for the worker-pool tests: process bookkeeping, scripts, loaders.

Kept free of pytest and Keras imports: worker processes started as fresh
interpreters (or by "spawn" / "forkserver") import this module to unpickle
the loaders defined here, and should start quickly.

Processes are inspected through /proc only (psutil is not a dependency).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# multiprocessing's own long-lived helpers (started by "spawn" and
# "forkserver"): children of the test process, but not keras_oom workers.
_HELPER_MARKERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


# -- /proc ------------------------------------------------------------------


def children(pid: int | None = None) -> set[int]:
    """Direct children of `pid` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def descendants(pid: int | None = None) -> set[int]:
    """All live descendants of `pid` (children, their children, ...)."""
    found: set[int] = set()
    todo = [os.getpid() if pid is None else pid]
    while todo:
        for c in children(todo.pop()):
            if c not in found and alive(c):
                found.add(c)
                todo.append(c)
    return found


def state(pid: int) -> str | None:
    """The one-letter state of `pid` from /proc/<pid>/stat, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    return state(pid) not in (None, "Z", "X")


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def is_mp_helper(pid: int) -> bool:
    """Whether `pid` is a multiprocessing forkserver or resource tracker."""
    line = cmdline(pid)
    return any(m in line for m in _HELPER_MARKERS)


def wait_gone(pids, timeout: float = 2.0) -> list[int]:
    """Polls until no pid in `pids` is alive; returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def worker_descendants() -> set[int]:
    """Live descendants of this process, without multiprocessing's helpers."""
    return {p for p in descendants() if not is_mp_helper(p)}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def shm_files() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


# -- scripts in a subprocess --------------------------------------------------


def package_root() -> str:
    """The directory holding the keras_oom this process imports.

    Usually REPO; when the tests run against another checkout (PYTHONPATH),
    scripts must run that one too.
    """
    import importlib.util

    spec = importlib.util.find_spec("keras_oom")
    assert spec is not None and spec.origin is not None
    return str(Path(spec.origin).resolve().parents[1])


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root(), str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env["KERAS_BACKEND"] = "jax"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONWARNINGS", None)
    return env


def write_script(tmp_path: Path, code: str, name: str = "script.py") -> Path:
    path = tmp_path / name
    path.write_text(code)
    return path


def run_script(tmp_path: Path, code: str, timeout: float = 60, **kw):
    """Runs `code` as a script with the repo importable; returns the result."""
    path = write_script(tmp_path, code)
    return subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=script_env(),
        cwd=tmp_path,
        **kw,
    )


def popen_script(tmp_path: Path, code: str, **kw) -> subprocess.Popen:
    path = write_script(tmp_path, code)
    return subprocess.Popen(
        [sys.executable, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=script_env(),
        cwd=tmp_path,
        **kw,
    )


def parse_pids(line: str) -> list[int]:
    """`"PIDS 12 34"` -> `[12, 34]`."""
    assert line.startswith("PIDS"), line
    return [int(p) for p in line.split()[1:]]


# -- loaders (module level, so every start method can import them) ----------


def ids_loader(ids):
    """A deterministic batch: a float array plus an int array, in a dict."""
    ids = np.asarray(ids)
    x = ids.astype(np.float32)[:, None] * np.arange(1, 4, dtype=np.float32)
    return {"x": x, "n": ids.astype(np.int64) * 7}


def big_loader(ids):
    """About 16 KiB per sample of float32: large batches take the memfd path."""
    ids = np.asarray(ids)
    return np.ones((len(ids), 4096), np.float32) * ids.astype(np.float32)[:, None]


def logging_loader(ids, path):
    """Appends the batch's ids to `path` (one line per batch), returns them."""
    with open(path, "a") as f:
        f.write(" ".join(str(int(i)) for i in ids) + "\n")
    return np.asarray(ids) * 2


def read_log(path) -> list[list[int]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [[int(i) for i in line.split()] for line in text.splitlines() if line]


class NeedsArgError(Exception):
    """Pickles, but cannot be unpickled: __init__ needs two arguments."""

    def __init__(self, what, extra):
        super().__init__(f"needs-arg failure: {what}")
        self.extra = extra


class LockHoldingError(Exception):
    """Cannot be pickled at all: it holds a lock."""

    def __init__(self, msg):
        import threading

        super().__init__(msg)
        self.lock = threading.Lock()


def faulty_loader(ids, actions, pidfile=None):
    """Misbehaves when the batch holds a sample id listed in `actions`.

    actions maps a sample id to "raise", "exit3", "sleep", "needs_arg" or
    "lock". With `pidfile`, the worker writes its pid there before sleeping.
    """
    for i in ids:
        action = actions.get(int(i))
        if action == "raise":
            raise ValueError(f"bad sample {int(i)}")
        if action == "exit3":
            os._exit(3)
        if action == "sleep":
            if pidfile is not None:
                tmp = f"{pidfile}.{os.getpid()}"
                with open(tmp, "w") as f:
                    f.write(str(os.getpid()))
                os.replace(tmp, pidfile)
            time.sleep(60)
        if action == "needs_arg":
            raise NeedsArgError(int(i), "extra")
        if action == "lock":
            raise LockHoldingError(f"lock failure {int(i)}")
    return np.asarray(ids) * 2


def wait_for_file(path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            text = ""
        if text:
            return text
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not appear within {timeout}s")


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def assert_no_new_workers(before: set[int], grace: float = 2.0) -> None:
    """Fails if a process that is not in `before` still descends from us."""
    deadline = time.monotonic() + grace
    while True:
        new = worker_descendants() - before
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not new, f"worker processes survived the test: {new} " + str(
        {p: cmdline(p)[:120] for p in new}
    )


# -- batches of every shape, for the transport tests ---------------------------

MIB = 1 << 20


def make_case(k: int):
    """Case `k` of a fixed list of batches that stress the transport."""
    rng = np.random.default_rng(k)
    big = rng.standard_normal((256, 1024)).astype(np.float32)  # 1 MiB
    f_order = np.asfortranarray(rng.standard_normal((300, 70)))
    cases = [
        rng.integers(0, 2, 50).astype(bool),
        rng.integers(-128, 127, (4, 5)).astype(np.int8),
        rng.standard_normal((3, 4)).astype(np.float16),
        (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(np.complex128),
        np.arange("2020-01-01", "2020-02-10", dtype="datetime64[D]"),
        np.array(["alpha", "βeta", "", "gamma-long-string"]),
        np.array([b"x", b"yy", b"zzz\x00q"], dtype="S5"),
        np.array([{"a": 1}, "two", None, 3.5], dtype=object),
        np.zeros((0, 7), np.float32),
        np.array(3.25),
        f_order,
        big,
        big[:, ::3],  # non-contiguous view
        big.T,  # Fortran-ordered view of a large array
        {
            "x": (big, [np.arange(5), {"deep": np.ones((2, 2), np.uint16)}]),
            "y": np.arange(256),
        },  # fmt: skip
        (big * 2, np.timedelta64(5, "s"), np.arange(3, dtype=np.uint64)),
        "just a string",
        {"a": 1, "b": [2, 3], "c": None},
        [np.zeros((128, 1024), np.float64), np.ones(10, np.int32)],  # 1 MiB + small
        np.zeros((2, 0, 3), dtype=[("a", "i4"), ("b", "f8")]),
        np.array([(1, 2.0), (3, 4.0)] * 5000, dtype=[("a", "i4"), ("b", "f8")]),
    ]
    return cases[k]


N_CASES = 21


def case_loader(ids):
    """Batch size 1: sample id k loads case k."""
    (k,) = (int(i) for i in ids)
    return make_case(k)


# -- loaders and worker_init functions for the pool's and the worker's tests ----


def worker_only_object_loader(ids):
    """Batches holding sample id 2 carry an object the parent cannot unpickle.

    Its class lives in a module made inside the worker, so pickling it there
    works (by reference) and unpickling it in the parent, which never ran
    this loader, fails with ModuleNotFoundError.
    """
    ids = np.asarray(ids)
    if 2 not in ids.tolist():
        return ids * 2
    import types

    name = "_keras_oom_only_in_the_worker"
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)

        class OnlyHere:
            pass

        OnlyHere.__module__ = name
        OnlyHere.__qualname__ = "OnlyHere"
        module.OnlyHere = OnlyHere  # type: ignore[attr-defined]
        sys.modules[name] = module
    return {"x": ids * 2, "obj": module.OnlyHere()}


def global_random_loader(ids):
    """Draws from NumPy's global generator, as many augmentations do."""
    return np.random.random(4)


class BadStrError(Exception):
    """A loader exception whose __str__ itself raises."""

    def __str__(self):
        raise RuntimeError("__str__ of BadStrError failed")


def bad_str_loader(ids):
    if 3 in np.asarray(ids).tolist():
        raise BadStrError("hidden")
    return np.asarray(ids)


class InitError(Exception):
    pass


class InitAbort(BaseException):
    """A `BaseException` subclass, as `SystemExit` or a library's abort is."""


def record_init(index, path):
    """worker_init that appends "<pid> <index>" to `path`."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {index}\n")


def raising_init(index, path):
    """worker_init that records its call in `path`, then raises InitError."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {index}\n")
    raise InitError(f"cannot open the database in worker {index}")


def base_raising_init(index, path):
    """worker_init that records its call in `path`, then raises InitAbort."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {index}\n")
    raise InitAbort(f"worker {index} aborts its setup")


def read_init_log(path) -> list[tuple[int, int]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [(int(a), int(b)) for a, b in (line.split() for line in text.splitlines())]


def failing_line_loader(ids):
    """Raises from a known line: FAILING_LINE, for the notes test."""
    raise OSError(f"Truncated File Read for {list(np.asarray(ids))}")  # FAILING_LINE


def features_loader(ids):
    """Three float32 features per sample, for a small Keras model."""
    ids = np.asarray(ids, dtype=np.float32)
    return np.stack([ids, ids * 0.5, -ids], axis=1) / 10


class InterruptingUnpickle:
    """A batch whose unpickling in the parent sends the parent Ctrl-C.

    Pickled in a worker, rebuilt in the parent: `_rebuild_interrupting`
    sends SIGINT to the process that unpickles it, so a test can land a
    KeyboardInterrupt exactly while the pool decodes a batch.
    """

    def __init__(self, ids):
        self.ids = np.asarray(ids)

    def __reduce__(self):
        return (_rebuild_interrupting, (self.ids, os.getpid()))


def _rebuild_interrupting(ids, pickled_in):
    if os.getpid() != pickled_in:
        os.kill(os.getpid(), signal.SIGINT)
    obj = InterruptingUnpickle.__new__(InterruptingUnpickle)
    obj.ids = ids
    return obj


def interrupting_loader(ids):
    """Batch 2 (ids 4 and 5 at batch size 2) interrupts its own unpickling."""
    if 4 in ids:
        return InterruptingUnpickle(ids)
    return ids * 2
