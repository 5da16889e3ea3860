"""The worker pool: every failure ends its batch, nothing hangs or spins.

Each test provokes one failure from issue 8 against real processes: a batch
the parent cannot unpickle, a replacement worker that cannot start, a user's
`os.fork()`, Ctrl-C while workers start, and `close()` from another thread
in the middle of a replacement. Scenarios that fork or interrupt the parent
run as scripts in a subprocess of their own.
"""

from __future__ import annotations

import collections
import errno
import functools
import os
import subprocess
import sys
import threading
import time

import _procs
import numpy as np
import pytest

import keras_oom
from keras_oom import DatasetClosedError, PrefetchLoaderDataset, WorkerDiedError
from keras_oom import pool as pool_module

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
    original = pool_module.WorkerPool._start_worker
    starts = []

    def start_worker(self, *args, **kwargs):
        starts.append(None)
        if len(starts) > 2:  # the first two start; no replacement can
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pool_module.WorkerPool, "_start_worker", start_worker)
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
    monkeypatch.setattr(pool_module, "_fork_is_safe", lambda: fork_is_safe[0])
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
def test_close_from_another_thread_during_a_replacement_releases_once(monkeypatch):
    handle_class = pool_module._SubprocessHandle
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
    pool = ds._pool
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
            while not pool._closed and time.monotonic() < deadline:
                time.sleep(0.005)
            with pool._state_lock:
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
    with PrefetchLoaderDataset(
        _procs.ids_loader, np.arange(12), batch_size=2, num_workers=2
    ) as ds:
        ds[0]
        ds[1]  # both kept for a re-read (TensorFlow's pattern)
        ds._pool._break(RuntimeError("no more workers"))
        for i in (0, 1, 2):
            with pytest.raises((RuntimeError, keras_oom.WorkerStartError)):
                ds[i]
