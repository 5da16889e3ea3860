"""How the local pool's workers start: start methods, fork safety, the setup.

`Launcher.start(worker_index)` starts one worker process and returns its
handle (`processes.Process`) and the parent's end of its socket; the pool
(process_pool.py) decides when. Also here: the setup pickled by value for
workers that are not forked (`pickle_setup`), the subprocess shim's command
line, the guard against an unguarded script re-run by `"spawn"`, and the
at-fork hook for the user's own `os.fork()`.

How a worker starts (`start_method`):

- `"fork"` (the default while it is safe): fast, and nothing is pickled.
  A forked child has none of the parent's other threads, and a thread pool
  that does not prepare for fork (GNU OpenMP, under torch and scikit-learn)
  deadlocks it. `forksafe.fork_hazards()` reads which threads run (from
  /proc) before every start; with any hazard the default switches to:
- `"subprocess"`: a fresh interpreter (`python -c`), with the parent's
  `sys.path` and the loader pickled by value with `cloudpickle`. Unlike
  `multiprocessing`'s `"spawn"` and `"forkserver"`, it does not re-import
  the user's main module, so an unguarded training script is not re-run.
- `"spawn"` and `"forkserver"`: `multiprocessing`'s own, on request. An
  explicit `"fork"` forks even beside a hazard, with one warning per pool.
- Every start runs under `processes.LAUNCH_LOCK`, and a forked worker first closes
  every descriptor the pool holds (`processes.OWNED_FDS`): the parent ends of all
  worker sockets, its own included, and pidfds.
- Each worker leads a session and process group of its own (worker.py),
  which the processes its loader starts inherit; a terminal's Ctrl-C
  reaches none of them. Workers are not daemonic, so a loader may start
  processes, and they are in no list of `multiprocessing`'s: the pool
  alone ends them (`processes.Process`).

"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.process
import os
import socket
import subprocess
import sys
import warnings
from multiprocessing.connection import Connection
from typing import Any

from keras_oom import processes
from keras_oom import worker as worker_module
from keras_oom.errors import WorkerStartError, describe_exit
from keras_oom.forksafe import fork_hazards
from keras_oom.processes import Process, close_conn, close_fd, new_connection
from keras_oom.protocol import WorkerSetup, safe_str

START_METHODS = ("fork", "forkserver", "spawn", "subprocess")

# The exit code of a worker that multiprocessing was starting by re-running
# the main module, and that found the main module starting workers itself.
MAIN_REIMPORT_EXIT = 87


class Unpicklable(Exception):
    """A start failed because the setup does not pickle: it never will."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Launcher:
    """Starts the workers of one pool.

    Picks the start method at every start (`default_start_method()` when
    `start_method` is None), pickles the setup once for the methods that
    need it, and warns once when an explicit `"fork"` is unsafe now.

    Args:
        setup: The loader and `worker_init`, shipped to every worker.
        start_method: One of `START_METHODS`, or None.
    """

    def __init__(self, setup: WorkerSetup, start_method: str | None) -> None:
        self.setup = setup
        self.start_method = start_method
        self._setup_bytes: bytes | None = None
        self._warned_fork = False

    def start(self, worker_index: int) -> tuple[Process, Any]:
        """Starts worker `worker_index`: its process and the parent's socket end.

        Every start runs under `processes.LAUNCH_LOCK`, from the socket
        pair to the moment the parent has closed the child's descriptors: a
        fork in another thread meanwhile would inherit them, and a forked
        worker must get the complete list of the pool's descriptors to close.

        Raises:
            Unpicklable: If the setup does not pickle (it never will).
            Exception: Whatever starting the process raised.
        """
        method = self._method_for_start()
        setup: Any = self.setup if method == "fork" else self._setup_pickled(method)
        with processes.LAUNCH_LOCK:
            conn, child_sock = new_connection()
            try:
                if method == "subprocess":
                    process = _start_subprocess(worker_index, child_sock)
                else:
                    process = _start_multiprocessing(
                        method, worker_index, child_sock, setup
                    )
            except BaseException:
                close_conn(conn)
                child_sock.close()
                raise
        try:
            if method == "subprocess":
                with contextlib.suppress(OSError):  # if it died, its sentinel tells
                    conn.send_bytes(setup)
            return process, conn
        except BaseException:
            # The process exists: a start that fails now must end it.
            close_conn(conn)
            process.close()
            raise

    def _setup_pickled(self, method: str) -> bytes:
        if self._setup_bytes is None:
            try:
                self._setup_bytes = pickle_setup(self.setup, method)
            except TypeError as e:
                raise Unpicklable(e) from e
        return self._setup_bytes

    def _method_for_start(self) -> str:
        if self.start_method is None:
            return default_start_method()
        if self.start_method == "fork" and not self._warned_fork:
            hazards = fork_hazards()
            if hazards:
                self._warned_fork = True
                warnings.warn(_fork_warning(hazards), RuntimeWarning, stacklevel=4)
        return self.start_method


def _start_multiprocessing(
    method: str, worker_index: int, child_sock: socket.socket, setup: Any
) -> Process:
    ctx: Any = multiprocessing.get_context(method)
    child_conn = Connection(child_sock.detach())
    # A forked worker closes these first thing: the parent ends of every
    # worker socket (its own included) and the pool's pidfds.
    inherited = sorted(processes.OWNED_FDS) if method == "fork" else []
    process = ctx.Process(
        target=worker_module.run,
        args=(child_conn, setup, os.getpid(), worker_index, inherited),
        name=f"keras_oom-worker-{worker_index}",
        # Not daemonic: a loader may start processes of its own
        # (multiprocessing refuses children to daemonic processes).
        # Workers die with the parent through their own watch instead.
        daemon=False,
    )
    try:
        process.start()
    finally:
        child_conn.close()
    # Ours alone to end: out of multiprocessing's list, whose exit
    # handler would join this non-daemonic process forever, and whose
    # clean-up at every start would reap it under `Process`.
    multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]
    try:
        return Process(
            process.pid,
            process=process,
            sentinel=process.sentinel,
            own_child=method != "forkserver",
        )
    except BaseException:
        process.kill()
        process.join(processes.KILL_GRACE)
        raise


def _start_subprocess(worker_index: int, child_sock: socket.socket) -> Process:
    child_fd = child_sock.detach()
    code = (
        f"import sys; sys.path[:] = {sys.path!r}; "
        f"from keras_oom.worker import subprocess_main; "
        f"subprocess_main({child_fd}, {os.getpid()}, {worker_index})"
    )
    pipe_r = pipe_w = None
    if not processes.pidfds_work():  # then a pipe tells when the child has exited
        pipe_r, pipe_w = os.pipe()
        processes.OWNED_FDS.add(pipe_r)
    try:
        popen = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=(child_fd,) if pipe_w is None else (child_fd, pipe_w),
            stdin=subprocess.DEVNULL,
            # A session (and process group) of its own: Ctrl-C during its
            # start-up, before it can ignore SIGINT, must not kill it, and
            # the pool ends it with every process its loader starts.
            start_new_session=True,
        )
    except BaseException:
        if pipe_r is not None:
            close_fd(pipe_r)
        raise
    finally:
        os.close(child_fd)
        if pipe_w is not None:
            os.close(pipe_w)
    return Process(popen.pid, popen=popen, pipe=pipe_r)


def pickle_setup(setup: WorkerSetup, method: str) -> bytes:
    """`setup` pickled by value for a worker that is not forked.

    Raises:
        TypeError: If it does not pickle, saying what to do instead.
    """
    try:
        return _dumps_naming_files(setup)
    except Exception as e:
        raise TypeError(
            f"The loader {setup.loader!r} (or worker_init) cannot be pickled "
            f"with cloudpickle, which start_method={method!r} needs "
            f"({type(e).__name__}: {safe_str(e)}). Make it picklable: open "
            f"files, connections and locks in each worker instead, in "
            f"`worker_init` or lazily on the loader's first call (see "
            f"docs/pool.md, 'Per-worker setup')."
        ) from e


def _dumps_naming_files(obj: Any) -> bytes:
    """`cloudpickle.dumps`, keeping the file name of code pickled by value.

    cloudpickle names the file of every function it pickles by value (one
    defined in the user's script) `<dynamic-code>`, so the worker's
    traceback could not say where the loader failed. Workers run on this
    machine, where the file is: with its real name, their tracebacks show
    the file and the failing line, as they do for a forked worker.
    """
    import io
    import types
    from collections import ChainMap

    import cloudpickle

    base = cloudpickle.Pickler.dispatch_table.get(types.CodeType)
    if base is None:  # a cloudpickle that reduces code otherwise
        return cloudpickle.dumps(obj)

    def reduce_code(code: types.CodeType) -> Any:
        rebuild, args = base(code)
        args = tuple(
            code.co_filename if isinstance(a, str) and a == "<dynamic-code>" else a
            for a in args
        )
        return rebuild, args

    class Pickler(cloudpickle.Pickler):
        dispatch_table = ChainMap(
            {types.CodeType: reduce_code}, cloudpickle.Pickler.dispatch_table
        )

    with io.BytesIO() as f:
        Pickler(f).dump(obj)
        return f.getvalue()


def default_start_method() -> str:
    """The start method that `start_method=None` picks now.

    Decided again for every worker start, from what runs in this process
    at that moment (see `keras_oom.forksafe`).

    Returns:
        `"fork"` where a forked child cannot deadlock: no thread runs but
        the caller's and those of fork-safe pools (NumPy's OpenBLAS), and
        neither JAX's runtime, TensorFlow nor CUDA has started. Otherwise
        `"subprocess"`, which is always safe.

    Example:

    ```python
    >>> from keras_oom.launch import default_start_method
    >>> default_start_method() in ("fork", "subprocess")
    True

    ```
    """
    if _fork_is_safe():
        return "fork"
    return "subprocess"


def _fork_is_safe() -> bool:
    if "fork" not in multiprocessing.get_all_start_methods():
        return False
    return not fork_hazards()


def _fork_warning(hazards: list[str]) -> str:
    return (
        f"start_method='fork': forking this process now can deadlock its "
        f"workers: {'; '.join(hazards)}. A forked child has none of these "
        f"threads, and whatever they hold (a lock, a thread pool's state) "
        f"stays held there: a worker whose loader enters such a pool (a "
        f"torch op, scikit-learn's compiled code, an OpenMP loop) waits "
        f"forever. Use start_method=None, which picks 'subprocess' here, "
        f"or 'subprocess'."
    )


def exit_if_reimporting_main() -> None:
    """Ends this process if it is a worker re-running an unguarded script.

    `"spawn"` and `"forkserver"` start a worker by importing the main
    module again (as `__mp_main__`), with `_inheriting` set on the current
    process. A script that starts workers at its top level, outside
    `if __name__ == "__main__":`, gets here in every worker, where
    multiprocessing would refuse to start processes and the script would
    run on. Exit at once with a code the parent recognises instead.
    """
    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return
    # runpy runs the script as __mp_main__; __main__ is still multiprocessing's.
    module = sys.modules.get("__mp_main__") or sys.modules.get("__main__")
    main = getattr(module, "__file__", None) or "the main module"
    sys.stderr.write(
        f"keras_oom: this worker process is re-running {main} (its start "
        f"method imports the main module again), which starts workers at its "
        f"top level: put the script's work under "
        f'`if __name__ == "__main__":`. Exiting.\n'
    )
    sys.stderr.flush()
    os._exit(MAIN_REIMPORT_EXIT)


def main_reimport_message(worker_index: int, pid: int, method: str | None) -> str:
    main = getattr(sys.modules.get("__main__"), "__file__", None) or "__main__"
    return (
        f"keras_oom worker {worker_index} (pid {pid}) exited before it was ready: "
        f"start_method={method!r} starts each worker by importing the main "
        f"module ({main}) again, and it starts this dataset's workers at its "
        f'top level, without an `if __name__ == "__main__":` guard, so every '
        f"worker would run the script again. Put the script's work under "
        f'`if __name__ == "__main__":`, or use start_method=None (the '
        f"default), which starts workers without importing the main module."
    )


def died_starting(
    worker: str, worker_index: int, pid: int, exitcode: int | None, method: str | None
) -> BaseException:
    """Why worker `worker` (its name, e.g. `"worker 0 (pid 12)"`) ended
    before it was ready: a `WorkerStartError` if it re-ran an unguarded
    script (that breaks the pool: every start would end so), else a
    `RuntimeError` for one failed start."""
    if exitcode == MAIN_REIMPORT_EXIT:
        return WorkerStartError(main_reimport_message(worker_index, pid, method))
    return RuntimeError(
        f"{worker} {describe_exit(exitcode)} before it was ready; see its "
        f"output above{reimport_hint(method)}"
    )


def reimport_hint(method: str | None) -> str:
    """Why a `"spawn"` / `"forkserver"` worker may die before it is ready."""
    if method not in ("spawn", "forkserver"):
        return ""
    return (
        f". start_method={method!r} imports the main module again in each "
        f"worker: if its output shows your script running again, guard the "
        f'script\'s work with `if __name__ == "__main__":`, or use '
        f"start_method=None (the default), which does not import it"
    )


def _after_fork_in_child() -> None:
    """In any child of a fork of this process: fresh locks, no leftovers.

    (The workers are in no list of multiprocessing's, so the child's exit
    handler cannot end the parent's workers.)
    """
    processes.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
