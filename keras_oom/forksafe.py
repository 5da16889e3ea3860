"""Whether this process can be forked safely, decided from what the OS shows.

A forked child has one thread, a copy of the one that called `fork()`; every
other thread of the parent is gone in the child, with whatever it was doing
and whatever lock it held. Whether that matters depends on who owns the
thread:

- A **thread pool that does not prepare for fork** keeps believing, in the
  child, that its threads exist, and the child's first parallel region waits
  for them forever. GNU OpenMP (libgomp) is such a pool: torch's intra-op
  pool uses it, and so does any library compiled with it (scikit-learn's
  compiled code bundles its own copy). LLVM's and Intel's OpenMP, oneTBB and
  XLA's pools (JAX, TensorFlow) are no better.
- **OpenBLAS's pthreads pool** (the one NumPy starts at import) stops its
  threads before a fork (`pthread_atfork`) and starts them again on demand,
  so it is safe: a rule of "any second thread" would never fork.
- A **Python thread** other than the caller can hold a lock the child needs
  (an import, `logging`, the allocator) mid operation.
- JAX's XLA runtime, TensorFlow and an initialised CUDA context are unsafe
  after a fork even without a thread of theirs in sight.

So `fork_hazards()` lists the threads of the process (`/proc/self/task`),
takes out the Python threads (`Thread.native_id`) and the threads of each
loaded OpenBLAS (read from the library through `ctypes`), and counts every
thread left as a hazard: a native thread that nobody can vouch for. The
libraries mapped into the process (`/proc/self/maps`) only name the likely
owner in the message. Where threads cannot be listed (no `/proc`), that is
a hazard too: the caller then starts fresh interpreters, which is always
safe.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

# Thread-pool libraries known not to survive a fork, by file-name prefix.
_UNSAFE_POOLS = (
    ("libgomp", "GNU OpenMP"),
    ("libomp", "LLVM OpenMP"),
    ("libiomp", "Intel OpenMP"),
    ("libtbb", "oneTBB"),
)
# A thread that has just ended (joined in Python) can stay listed in
# /proc for a moment while the kernel tears it down: look again this often.
_RESCANS = 3
_RESCAN_PAUSE = 0.001


def fork_hazards() -> list[str]:
    """What in this process could deadlock a child forked from it now.

    Returns:
        One clause per hazard found (e.g. `"2 native threads run that
        neither Python nor OpenBLAS started (likely GNU OpenMP's pool,
        libgomp.so.1)"`); an empty list when forking is safe.
    """
    hazards = _framework_hazards()
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        names = ", ".join(repr(t.name) for t in others[:3])
        more = ", ..." if len(others) > 3 else ""
        runs = _count(len(others), "other Python thread", "runs", "run")
        hazards.append(f"{runs} ({names}{more})")
    hazards += _native_thread_hazards()
    return hazards


def _framework_hazards() -> list[str]:
    """Frameworks that must not be forked once started, threads or not."""
    found = []
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    if xla_bridge is not None and getattr(xla_bridge, "_backends", None):
        found.append("JAX's XLA runtime is running")
    if "tensorflow" in sys.modules:
        found.append("TensorFlow is imported")
    torch_cuda = sys.modules.get("torch.cuda")
    if torch_cuda is not None and torch_cuda.is_initialized():
        found.append("CUDA is initialised (torch)")
    return found


def _native_thread_hazards() -> list[str]:
    """Threads that neither Python nor a fork-safe pool started."""
    libraries: list[str] | None = None
    pooled = 0
    for attempt in range(_RESCANS + 1):
        tasks = _thread_ids()
        if tasks is None:
            return ["the threads of this process cannot be listed (no /proc)"]
        unknown = tasks - {t.native_id for t in threading.enumerate()}
        if not unknown:
            return []
        if libraries is None:  # read once: the maps of torch run to 1000s of lines
            libraries = _mapped_libraries()
            pooled = sum(_openblas_threads(path) for path in libraries)
        count = len(unknown) - pooled
        if count <= 0:
            return []
        if attempt < _RESCANS:
            time.sleep(_RESCAN_PAUSE)
    pools = [
        f"{name}'s pool, {os.path.basename(path)}"
        for path in libraries or []
        for prefix, name in _UNSAFE_POOLS
        if os.path.basename(path).startswith(prefix)
    ]
    likely = f"likely {'; '.join(pools)}" if pools else "of unknown origin"
    runs = _count(count, "native thread", "runs", "run")
    return [f"{runs} that neither Python nor OpenBLAS started ({likely})"]


def _thread_ids() -> set[int] | None:
    """The kernel's ids of this process's live threads, or None without /proc."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    live = set()
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # ended meanwhile
        if state not in ("Z", "X"):
            live.add(int(tid))
    return live


def _mapped_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process, in map order."""
    seen: dict[str, None] = {}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and ".so" in fields[5]:
                    seen.setdefault(fields[5].strip(), None)
    except OSError:
        return []
    return list(seen)


def _openblas_threads(path: str) -> int:
    """How many pool threads the OpenBLAS at `path` runs; 0 if not one.

    OpenBLAS's pthreads server starts `blas_num_threads - 1` threads while
    `blas_server_avail` is set (both exported variables); it is cleared
    when the pool is shut down, as before a fork. An OpenBLAS built on
    OpenMP (`openblas_get_parallel() == 2`) runs OpenMP's threads, which
    stay unexplained. Anything unreadable counts as no OpenBLAS thread, so
    its threads stay unexplained too: the safe side.
    """
    if "openblas" not in os.path.basename(path).lower():
        return 0
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        layer = None
        for prefix in ("openblas", "scipy_openblas"):
            for suffix in ("", "64_", "_64_"):
                function = getattr(lib, f"{prefix}_get_parallel{suffix}", None)
                if function is not None:
                    function.restype = ctypes.c_int
                    layer = function()
                    break
            if layer is not None:
                break
        if layer != 1:  # sequential, OpenMP, or unknown
            return 0
        if not ctypes.c_int.in_dll(lib, "blas_server_avail").value:
            return 0
        return max(0, ctypes.c_int.in_dll(lib, "blas_num_threads").value - 1)
    except (OSError, ValueError, AttributeError):
        return 0


def _count(n: int, noun: str, verb: str = "", verbs: str = "") -> str:
    """`_count(2, "thread", "runs", "run")` -> `"2 threads run"`."""
    said = f"{n} {noun}{'' if n == 1 else 's'}"
    verb = verb if n == 1 else verbs
    return f"{said} {verb}" if verb else said
