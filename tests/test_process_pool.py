"""The local executor (process_pool.py): every failure ends its batch,
nothing hangs or spins, and every process it starts it ends.

Each test provokes one failure from issue 8 against real processes: a batch
the parent cannot unpickle, a replacement worker that cannot start, a user's
`os.fork()`, Ctrl-C while workers start, and `close()` from another thread
in the middle of a replacement. Scenarios that fork or interrupt the parent
run as scripts in a subprocess of their own. How workers start (start
methods, fork safety): test_launch.py.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import os
import subprocess
import sys
import threading
import time

import _launch_loaders
import _procs
import numpy as np
import pytest

import keras_oom
from keras_oom import (
    DatasetClosedError,
    PrefetchLoaderDataset,
    WorkerDiedError,
    launch,
    processes,
)
from keras_oom import process_pool as pool_module
from keras_oom.executor import MAX_START_FAILURES
from keras_oom.pool_worker import PoolWorker
from keras_oom.protocol import WorkerSetup

pytestmark = pytest.mark.timeout(60)


def faulty(actions):
    return functools.partial(_procs.faulty_loader, actions=actions)


def notes(error: BaseException) -> str:
    return "\n".join(getattr(error, "__notes__", []))


def read_until_start_error(ds, limit: int = 200) -> list[BaseException]:
    """Reads batches in order, epoch after epoch, until WorkerStartError.

    Returns every error raised on the way, the WorkerStartError last.
    """
    errors: list[BaseException] = []
    for n in range(limit):
        i = n % len(ds)
        if i == 0 and n:
            ds.on_epoch_end()
        try:
            ds[i]
        except keras_oom.WorkerStartError as e:
            errors.append(e)
            return errors
        except Exception as e:
            errors.append(e)
    raise AssertionError(f"no WorkerStartError after {limit} reads: {errors!r}")


# -- 1. a batch the parent cannot unpickle --------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore:PrefetchLoaderDataset. batches are requested")
def test_batch_that_does_not_unpickle_is_named_and_rereading_it_does_not_hang():
    with PrefetchLoaderDataset(
        _procs.worker_only_object_loader,
        np.arange(6),
        batch_size=1,
        num_workers=2,
        start_method="fork",
    ) as ds:
        for _ in range(2):  # the same batch again in the next epoch
            np.testing.assert_array_equal(ds[1], [2])
            with pytest.raises(ImportError) as info:
                ds[2]
            assert "batch 2" in notes(info.value), notes(info.value)
            np.testing.assert_array_equal(ds[3], [6])
            ds.on_epoch_end()
        # And the same epoch again: a retry of the failed index.
        with pytest.raises(ImportError):
            ds[2]
        np.testing.assert_array_equal(ds[4], [8])


# -- 2. a replacement worker that cannot start -----------------------------------


@pytest.mark.timeout(30)
def test_replacement_that_cannot_be_forked_breaks_the_pool_instead_of_spinning(
    monkeypatch,
):
    original = launch.Launcher.start
    starts = []

    def start_worker(self, *args, **kwargs):
        starts.append(None)
        if len(starts) > 2:  # the first two start; no replacement can
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(launch.Launcher, "start", start_worker)
    ds = PrefetchLoaderDataset(
        faulty({2: "exit3"}),
        np.arange(8),
        batch_size=1,
        num_workers=2,
        start_method="fork",
    )
    try:
        errors = read_until_start_error(ds)
        # The dead worker's batch failed with the death, named.
        assert isinstance(errors[0], WorkerDiedError), errors
        assert "batch 2" in str(errors[0])
        assert "EAGAIN" in str(errors[-1]) or "temporarily" in str(errors[-1])
        tries = len(starts)
        # Broken: every later read raises at once. (Batches 0 and 1 may
        # still come from the parent's re-read cache, which needs no worker.)
        for i in range(2, 5):
            with pytest.raises(keras_oom.WorkerStartError):
                ds[i]
        assert len(starts) == tries  # and stops trying
    finally:
        ds.close()


@pytest.mark.timeout(30)
def test_unpicklable_loader_when_the_default_switches_to_subprocess(monkeypatch):
    # Fork is safe when the workers start; then (as when JAX starts) it is
    # not, and the replacement of a dead worker needs the loader pickled.
    fork_is_safe = [True]
    monkeypatch.setattr(launch, "_fork_is_safe", lambda: fork_is_safe[0])
    lock = threading.Lock()  # cloudpickle cannot pickle a lock

    def loader(ids):
        with lock:
            if 2 in ids.tolist():
                os._exit(3)
            return ids * 2

    ds = PrefetchLoaderDataset(loader, np.arange(8), batch_size=1, num_workers=2)
    try:
        assert len(ds.worker_pids) == 2  # started, forked
        fork_is_safe[0] = False
        errors = read_until_start_error(ds)
        # The lost batch fails with the death, or with why no worker can
        # replace it; then the pool is broken.
        assert isinstance(errors[0], (WorkerDiedError, TypeError)), errors
        said = " ".join(f"{type(e).__name__}: {e}" for e in errors)
        assert "pickle" in said, said  # it says why
        for i in range(2, 5):
            with pytest.raises(keras_oom.WorkerStartError):
                ds[i]
    finally:
        ds.close()


# -- 3. the user's own os.fork() -------------------------------------------------

FORK_SCRIPT = """
import os, signal, sys
import numpy as np
import _launch_loaders
import _procs
from keras_oom import PrefetchLoaderDataset

ids = np.arange(16)
ds = PrefetchLoaderDataset(_procs.ids_loader, ids, batch_size=2, num_workers=2,
                           start_method="fork")

def check(i):
    got, want = ds[i], _procs.ids_loader(ids[2 * i : 2 * i + 2])
    assert all(np.array_equal(got[k], want[k]) for k in want), (i, got)

print("OWNER", os.getpid())
check(0)
pids = ds.worker_pids

# A child that only exits: multiprocessing's exit handler runs in it.
child = os.fork()
if child == 0:
    sys.exit(0)
_, status = os.waitpid(child, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
dead = [p for p in pids if not _procs.alive(p)]
assert not dead, f"the child's exit ended the parent's workers {dead}"
check(1)
check(2)

# A child that reads: it must refuse, and leave the parent's sockets alone.
r, w = os.pipe()
child = os.fork()
if child == 0:
    signal.alarm(20)  # a child that hangs must not outlive the test
    os.close(r)
    try:
        ds[3]
        said = "READ A BATCH"
    except RuntimeError as e:
        said = f"{type(e).__name__}: {e}"
    os.write(w, said.encode())
    os.close(w)
    sys.exit(0)
os.close(w)
with os.fdopen(r) as f:
    said = f.read()
_, status = os.waitpid(child, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
print("CHILD", said)
assert ds.worker_pids == pids
for i in range(3, 8):
    check(i)
ds.close()
print("OK")
"""


@pytest.mark.timeout(90)
def test_user_fork_neither_kills_nor_steals_from_the_parents_workers(tmp_path):
    result = _procs.run_script(tmp_path, FORK_SCRIPT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    (child_line,) = [x for x in result.stdout.splitlines() if x.startswith("CHILD")]
    assert "RuntimeError" in child_line, child_line
    (owner,) = [x.split()[1] for x in result.stdout.splitlines() if x[:5] == "OWNER"]
    assert f"process {owner}" in child_line, child_line  # names the owner
    assert result.stdout.splitlines()[-1] == "OK"


# -- 4. Ctrl-C while workers start -----------------------------------------------

CTRL_C_SCRIPT = """
import os, signal, sys, time
import numpy as np
import _launch_loaders
import _procs
from keras_oom import PrefetchLoaderDataset

def main(method, num_workers):
    ids = np.arange(16)
    ds = PrefetchLoaderDataset(_procs.ids_loader, ids, batch_size=2,
                               num_workers=num_workers, start_method=method)
    ds.worker_pids  # starts the workers; they are still starting up
    interrupted = False
    try:
        os.killpg(0, signal.SIGINT)  # Ctrl-C: the whole process group
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)
    except KeyboardInterrupt:
        interrupted = True
    assert interrupted
    for epoch in range(2):
        for i in range(len(ds)):
            got, want = ds[i], _procs.ids_loader(ids[2 * i : 2 * i + 2])
            assert all(np.array_equal(got[k], want[k]) for k in want), (i, got)
        ds.on_epoch_end()
    ds.close()
    print("OK")

if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [2, 3])
@pytest.mark.parametrize("start_method", ["subprocess", "spawn"])
def test_ctrl_c_while_workers_start_leaves_a_working_pool(
    tmp_path, start_method, num_workers
):
    path = _procs.write_script(tmp_path, CTRL_C_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(path), start_method, str(num_workers)],
        capture_output=True,
        text=True,
        timeout=90,
        env=_procs.script_env(),
        cwd=tmp_path,
        start_new_session=True,  # its own process group, for killpg
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "OK"


# -- 16. close() from another thread during a replacement -----------------------


@pytest.mark.timeout(60)
def test_close_from_another_thread_during_a_replacement_releases_once(
    monkeypatch, started
):
    """Issue 8.16, and Kind D (issue 14.6): close() from another thread while
    the owner replaces a dead worker releases each worker once, and ends
    every process the pool started, the replacement's included."""
    handle_class = processes.Process
    closes: collections.Counter[int] = collections.Counter()
    original_close, original_join = handle_class.close, handle_class.join

    def close(self):
        closes[id(self)] += 1
        original_close(self)

    ds = PrefetchLoaderDataset(
        faulty({0: "exit3"}),
        np.arange(4),
        batch_size=1,
        num_workers=2,
        start_method="subprocess",
    )
    assert len(ds.worker_pids) == 2  # started
    pool = ds._engine.executor
    closer_errors: list[BaseException] = []
    closer = threading.Thread(
        target=lambda: _capture(ds.close, closer_errors), name="closer"
    )

    def join(self, timeout=None):
        # The owner reaps the dead worker: close() from another thread now,
        # and let the owner go on once close() has taken the worker list.
        main = threading.current_thread() is threading.main_thread()
        if main and closer.ident is None and self.exitcode is not None:
            closer.start()
            deadline = time.monotonic() + 10
            while not pool.closed and time.monotonic() < deadline:
                time.sleep(0.005)
            with pool._workers.lock:
                pass
        return original_join(self, timeout)

    monkeypatch.setattr(handle_class, "close", close)
    monkeypatch.setattr(handle_class, "join", join)
    try:
        with pytest.raises((WorkerDiedError, DatasetClosedError)):
            ds[0]
        assert closer.ident is not None, "the replacement was never reached"
        closer.join(10)
        assert not closer.is_alive()
    finally:
        monkeypatch.undo()
        ds.close()
    assert not closer_errors, closer_errors
    twice = {k: n for k, n in closes.items() if n > 1}
    assert not twice, f"worker handles released more than once: {twice}"
    assert_ended(started)


def _capture(fn, errors):
    try:
        fn()
    except BaseException as e:
        errors.append(e)


@pytest.mark.timeout(60)
def test_ctrl_c_while_a_batch_is_unpickled_leaves_it_readable():
    """Issue 8.1: a KeyboardInterrupt that lands while the parent unpickles
    a batch (here batch 2, loaded ahead during an earlier read) is delivered
    once the pool's state is consistent; every batch can then be read, and
    batch 2 is not loaded (nor interrupted) a second time."""
    interrupts = 0

    def read(ds, i):
        nonlocal interrupts
        for _ in range(3):
            try:
                return ds[i]
            except KeyboardInterrupt:
                interrupts += 1
        raise AssertionError(f"batch {i} kept being interrupted")

    with PrefetchLoaderDataset(
        _procs.interrupting_loader, np.arange(12), batch_size=2, num_workers=2
    ) as ds:
        np.testing.assert_array_equal(read(ds, 0), [0, 2])
        np.testing.assert_array_equal(read(ds, 1), [4, 6])
        value = read(ds, 2)
        assert isinstance(value, _procs.InterruptingUnpickle)
        np.testing.assert_array_equal(value.ids, [4, 5])
        np.testing.assert_array_equal(read(ds, 3), [12, 14])
    assert interrupts == 1


@pytest.mark.timeout(60)
def test_a_broken_pool_raises_at_once_also_for_batches_kept_for_a_reread():
    """Kind B: what broke the pool is raised itself at the next read, even of
    a batch kept for a re-read, then as the cause of a WorkerStartError."""
    with PrefetchLoaderDataset(
        _procs.ids_loader, np.arange(12), batch_size=2, num_workers=2
    ) as ds:
        ds[0]
        ds[1]  # both kept for a re-read (TensorFlow's pattern)
        broken = ValueError("no more workers")
        ds._engine.executor._restarts.break_(broken)
        with pytest.raises(ValueError, match="no more workers") as first:
            ds[0]
        assert first.value is broken
        for i in (1, 2):
            with pytest.raises(
                keras_oom.WorkerStartError, match="pool is broken: .*no more workers"
            ) as info:
                ds[i]
            assert info.value.__cause__ is broken


# -- issue 14, Kind D: every process the pool starts is ended by the pool -------


@pytest.fixture
def started(monkeypatch) -> list[int]:
    """The pid of every worker process started during the test, in order.

    Recorded as each `PoolWorker` is built: a start that fails after its
    process exists is recorded too.
    """
    pids: list[int] = []
    original = PoolWorker.__init__

    def init(self, slot, process, conn):
        pids.append(process.pid)
        original(self, slot, process, conn)

    monkeypatch.setattr(PoolWorker, "__init__", init)
    return pids


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def not_ended(pids) -> list[int]:
    """Those of `pids` that run, or that died but this process has not reaped."""
    me = os.getpid()
    return [
        p
        for p in pids
        if _procs.alive(p) or (_procs.state(p) == "Z" and _ppid(p) == me)
    ]


def assert_ended(pids, timeout: float = 5.0) -> None:
    """Waits until every pid in `pids` is ended (and reaped), or fails."""
    deadline = time.monotonic() + timeout
    left = not_ended(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = not_ended(pids)
    assert not left, {p: (_procs.state(p), _procs.cmdline(p)[:80]) for p in left}


def lost(started: list[int], ds) -> list[int]:
    """The workers that have left `ds`'s pool."""
    return [p for p in started if p not in ds.worker_pids]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_worker_whose_stream_broke_is_ended(started, start_method):
    """Kind D (issue 14.6): a worker whose replies cannot be read any more
    (here it writes a frame that does not unpickle) is given up, though it
    goes on running. A forked one held the parent's end of its own socket,
    so it never saw end-of-file and outlived `close()`. The pool must end it
    as it gives it up."""
    ds = PrefetchLoaderDataset(
        _launch_loaders.garbage_loader,
        np.arange(6),
        batch_size=1,
        num_workers=2,
        start_method=start_method,
    )
    try:
        np.testing.assert_array_equal(ds[0], [0])
        np.testing.assert_array_equal(ds[1], [2])
        with pytest.raises(WorkerDiedError, match="batch 2"):
            ds[2]
        np.testing.assert_array_equal(ds[3], [6])
        gone = lost(started, ds)
        assert len(gone) == 1, (started, ds.worker_pids)
        assert_ended(gone)  # ended as it leaves the pool, not at close
    finally:
        ds.close()
    assert_ended(started)


@pytest.mark.timeout(30)
def test_worker_past_its_timeout_is_ended(started, tmp_path):
    """Kind D: a loader that hangs past `timeout` leaves the pool: its
    worker is ended and reaped at once."""
    ds = PrefetchLoaderDataset(
        faulty({3: "sleep"}),
        np.arange(6),
        batch_size=1,
        num_workers=1,
        timeout=1.0,
        start_method="fork",
    )
    with ds:
        with pytest.raises(keras_oom.WorkerTimeoutError):
            ds[3]
        np.testing.assert_array_equal(ds[4], [8])
        assert_ended(lost(started, ds))
    assert_ended(started)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_killed_worker_is_reaped(started, start_method):
    """Kind D: a worker killed from outside leaves the pool reaped, not as a
    zombie until close."""
    with PrefetchLoaderDataset(
        _procs.ids_loader,
        np.arange(8),
        batch_size=1,
        num_workers=2,
        start_method=start_method,
    ) as ds:
        ds[0]
        victim = ds.worker_pids[0]
        _procs.kill(victim)
        for i in range(1, len(ds)):
            with contextlib.suppress(WorkerDiedError):  # the killed worker's
                ds[i]
        assert victim in lost(started, ds)
        assert_ended([victim])
    assert_ended(started)


@pytest.mark.timeout(30)
def test_workers_that_die_before_ready_are_ended(started):
    """Kind D: a start failure (each worker exits before it is ready, until
    the pool gives up) leaves no process behind."""
    ds = PrefetchLoaderDataset(
        _procs.ids_loader,
        np.arange(8),
        batch_size=2,
        num_workers=2,
        start_method="fork",
        worker_init=_launch_loaders.exiting_init,
    )
    try:
        read_until_start_error(ds)
    finally:
        ds.close()
    assert len(started) >= MAX_START_FAILURES
    assert_ended(started)


@pytest.mark.timeout(30)
def test_start_that_fails_after_its_process_exists_ends_it(started, monkeypatch):
    """Kind D: a start that raises after the worker process was forked
    (here building the worker's record fails, as a descriptor limit would
    make it) must end that process; the pool retries the slot."""
    original = PoolWorker.__init__  # the `started` fixture's
    calls = []

    def init(self, slot, process, conn):
        calls.append(slot)
        original(self, slot, process, conn)
        if len(calls) == 1:
            raise OSError(24, "Too many open files")

    monkeypatch.setattr(PoolWorker, "__init__", init)
    with PrefetchLoaderDataset(
        _procs.ids_loader,
        np.arange(8),
        batch_size=2,
        num_workers=2,
        start_method="fork",
    ) as ds:
        for i in range(len(ds)):
            got = ds[i]
            np.testing.assert_array_equal(got["n"], [14 * i, 14 * i + 7])
        assert started[0] not in ds.worker_pids  # never joined the pool
        assert_ended(started[:1])
    assert_ended(started)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_broken_pool_ends_every_worker(started, tmp_path, start_method):
    """Kind D: a `worker_init` that raises breaks the pool; its workers,
    alive or not, are ended by close."""
    ds = PrefetchLoaderDataset(
        _procs.ids_loader,
        np.arange(8),
        batch_size=2,
        num_workers=2,
        start_method=start_method,
        worker_init=functools.partial(_procs.raising_init, path=str(tmp_path / "i")),
    )
    try:
        with pytest.raises(_procs.InitError):
            ds[0]
    finally:
        ds.close()
    assert started
    assert_ended(started)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_close_while_workers_start_ends_every_worker(started, start_method):
    """Kind D: `close()` from another thread while the pool is starting its
    workers (the engine alone, without Keras): every worker started before,
    during or after the close is ended."""
    setup = WorkerSetup(_procs.ids_loader, None)
    pool = pool_module.ProcessPool(start_method)
    errors: list[BaseException] = []
    starter = threading.Thread(
        target=lambda: _capture(lambda: pool.start(setup, 4), errors)
    )
    starter.start()
    deadline = time.monotonic() + 20
    while not started and time.monotonic() < deadline:
        time.sleep(0.001)
    pool.close()
    starter.join(20)
    assert not starter.is_alive()
    assert started
    assert all(isinstance(e, DatasetClosedError) for e in errors), errors
    assert_ended(started)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_close_during_a_read_from_another_thread_ends_every_worker(
    started, tmp_path, start_method
):
    """Kind D: the owner waits for a stuck loader; another thread closes:
    the owner gets `DatasetClosedError` and every worker is ended."""
    pidfile = tmp_path / "pid"
    ds = PrefetchLoaderDataset(
        functools.partial(
            _procs.faulty_loader, actions={2: "sleep"}, pidfile=str(pidfile)
        ),
        np.arange(6),
        batch_size=1,
        num_workers=1,
        start_method=start_method,
    )
    ds[0]
    closer = threading.Thread(
        target=lambda: (_procs.wait_for_file(pidfile), ds.close())
    )
    closer.start()
    try:
        with pytest.raises(DatasetClosedError):
            ds[2]
    finally:
        closer.join(20)
        ds.close()
    assert_ended(started)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_garbage_collected_dataset_ends_every_worker(started, start_method):
    """Kind D: dropping the last reference closes the dataset; every worker
    is ended and reaped."""
    import gc

    ds = PrefetchLoaderDataset(
        _procs.ids_loader,
        np.arange(8),
        batch_size=2,
        num_workers=2,
        start_method=start_method,
    )
    ds[0]
    del ds
    gc.collect()
    assert len(started) == 2
    assert_ended(started)


# -- issue 14, Kind D item 10: a loader that starts processes of its own --------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "subprocess", "spawn"])
@pytest.mark.parametrize("kind", ["lazy", "per_call", "sleeper"])
def test_loader_with_its_own_multiprocessing_pool(
    started, tmp_path, start_method, kind
):
    """Kind D (issue 14.10): a loader that maps over a
    `multiprocessing.Pool(2)` failed in forked workers (`daemonic processes
    are not allowed to have children`). It must give the right batches, and
    after close neither the workers nor the loader's processes are left."""
    log = tmp_path / "pool-pids"
    loader = {
        "lazy": _launch_loaders.lazy_pool_loader,
        "per_call": _launch_loaders.per_call_pool_loader,
        "sleeper": _launch_loaders.sleeper_loader,  # a child that never ends
    }[kind]
    ids = np.arange(12)
    with PrefetchLoaderDataset(
        functools.partial(loader, path=str(log)),
        ids,
        batch_size=3,
        num_workers=2,
        start_method=start_method,
    ) as ds:
        for _ in range(2):  # two epochs
            for i in range(len(ds)):
                np.testing.assert_array_equal(ds[i], ids[3 * i : 3 * i + 3] ** 2)
            ds.on_epoch_end()
    children = _launch_loaders.read_pids(log)
    assert len(children) >= (2 if kind == "sleeper" else 4), children
    assert_ended(started)
    assert_ended(children)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_killed_worker_takes_its_loaders_processes_with_it(
    started, tmp_path, start_method
):
    """Kind D (issue 14.10): a worker killed by SIGKILL cannot end the
    processes its loader started (here one that would sleep for minutes);
    the pool ends them as it replaces the worker."""
    log = tmp_path / "pool-pids"
    with PrefetchLoaderDataset(
        functools.partial(_launch_loaders.sleeper_loader, path=str(log)),
        np.arange(8),
        batch_size=2,
        num_workers=1,
        start_method=start_method,
    ) as ds:
        np.testing.assert_array_equal(ds[0], [0, 1])
        children = _launch_loaders.read_pids(log)
        assert len(children) == 1 and all(_procs.alive(p) for p in children)
        _procs.kill(ds.worker_pids[0])
        for i in range(1, len(ds)):
            with contextlib.suppress(WorkerDiedError):  # the killed worker's
                np.testing.assert_array_equal(ds[i], np.arange(2 * i, 2 * i + 2) ** 2)
        assert_ended(children)
    assert_ended(started)


EXIT_WITH_POOL_LOADER_SCRIPT = """
import functools, sys
import numpy as np
import _launch_loaders as L
from keras_oom import PrefetchLoaderDataset

if __name__ == "__main__":  # "spawn" imports this module in each worker
    ds = PrefetchLoaderDataset(
        functools.partial(L.lazy_pool_loader, path=sys.argv[2]), np.arange(8),
        batch_size=2, num_workers=2, start_method=sys.argv[1])
    assert ds[1].tolist() == [4, 9]
    print("PIDS", *ds.worker_pids, flush=True)
    # No close: interpreter exit must neither hang nor leave a process behind.
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_interpreter_exit_with_an_open_dataset_whose_loader_has_a_pool(
    tmp_path, start_method
):
    """Kind D (issue 14.10): workers that may start children are not
    daemonic; multiprocessing's exit handler joins non-daemonic children,
    which would wait forever for workers that serve until told to stop."""
    log = tmp_path / "pool-pids"
    path = _procs.write_script(tmp_path, EXIT_WITH_POOL_LOADER_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(path), start_method, str(log)],
        capture_output=True,
        text=True,
        timeout=40,
        env=_procs.script_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("PIDS")]
    workers = _procs.parse_pids(line)
    assert _procs.wait_gone(workers, 5.0) == []
    assert _procs.wait_gone(_launch_loaders.read_pids(log), 5.0) == []
