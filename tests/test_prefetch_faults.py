"""PrefetchLoaderDataset when things go wrong, and how its workers end.

Worker pools fail in ways a plain loader never does: a worker dies, hangs,
raises an exception that cannot travel back, or outlives its parent; Ctrl-C
reaches every process; JAX makes forking unsafe. Each promise is checked
against real processes, with per-test timeouts so that a regression fails
instead of hanging, and an autouse fixture that fails any test leaving a
worker process behind. Scenarios that kill or interrupt the parent run in a
subprocess script.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import signal
import subprocess
import threading
import time
import traceback

import _faults
import _procs
import numpy as np
import pytest
from test_transport import memfd_mappings

from keras_oom import (
    DatasetClosedError,
    LoaderDataset,
    PrefetchLoaderDataset,
    WorkerDiedError,
    WorkerTimeoutError,
    stack_samples,
)
from keras_oom.protocol import RemoteTraceback

pytestmark = pytest.mark.timeout(60)


def faulty(actions, pidfile=None):
    return functools.partial(
        _procs.faulty_loader,
        actions=actions,
        pidfile=None if pidfile is None else str(pidfile),
    )


IDS = np.arange(24)  # batch_size 4: batch k holds ids 4k .. 4k+3


def expect(ds, i):
    np.testing.assert_array_equal(ds[i], IDS[4 * i : 4 * i + 4] * 2)


# -- loader exceptions ----------------------------------------------------------


def test_loader_exception_reaches_the_caller_with_its_traceback():
    with PrefetchLoaderDataset(
        faulty({9: "raise"}), IDS, batch_size=4, num_workers=2
    ) as ds:
        expect(ds, 0)
        expect(ds, 1)
        with pytest.raises(ValueError, match="bad sample 9") as info:
            ds[2]
        error = info.value
        assert type(error) is ValueError
        assert isinstance(error.__cause__, RemoteTraceback)
        remote = str(error.__cause__)
        assert "faulty_loader" in remote
        assert 'raise ValueError(f"bad sample {int(i)}")' in remote
        notes = " ".join(getattr(error, "__notes__", []))
        assert "batch 2" in notes
        assert "[8, 9, 10" in notes
        pids = ds.worker_pids
        assert any(f"pid {p}" in notes for p in pids), (notes, pids)
        # The full report shows the worker's traceback.
        report = "".join(traceback.format_exception(error))
        assert "faulty_loader" in report
        # The pool is still usable, with the same workers.
        for i in range(3, len(ds)):
            expect(ds, i)
        expect(ds, 0)
        assert ds.worker_pids == pids
        # The failing batch fails again, freshly loaded.
        with pytest.raises(ValueError, match="bad sample 9"):
            ds[2]


def test_exception_that_does_not_pickle_becomes_runtime_error():
    name = "LockHoldingError"
    with PrefetchLoaderDataset(
        faulty({5: "lock"}), IDS, batch_size=4, num_workers=2
    ) as ds:
        expect(ds, 0)
        with pytest.raises(RuntimeError, match=name) as info:
            ds[1]
        assert type(info.value) is RuntimeError
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert name in str(info.value.__cause__)
        notes = " ".join(getattr(info.value, "__notes__", []))
        assert "batch 1" in notes
        expect(ds, 2)
        expect(ds, 3)


def test_exception_whose_init_refuses_unpickling_arrives_as_itself():
    """Kind C: `pickle` rebuilds an exception as `cls(*args)`, which an
    `__init__` taking other arguments refuses: it became a `RuntimeError`;
    rebuilt from its class, args and attributes, it is the loader's own."""
    with PrefetchLoaderDataset(
        faulty({5: "needs_arg"}), IDS, batch_size=4, num_workers=2
    ) as ds:
        expect(ds, 0)
        with pytest.raises(_procs.NeedsArgError, match="needs-arg failure: 5") as info:
            ds[1]
        assert info.value.extra == "extra"
        assert isinstance(info.value.__cause__, RemoteTraceback)
        expect(ds, 2)


def test_batch_that_does_not_pickle_becomes_an_error():
    def loader(ids):
        return threading.Lock() if 5 in ids else ids * 2

    with PrefetchLoaderDataset(loader, IDS, batch_size=4, num_workers=2) as ds:
        expect(ds, 0)
        with pytest.raises(TypeError, match="lock"):
            ds[1]
        expect(ds, 2)


# -- an exception of any class at any step of a read (issue 14, Kind C) ----------


@contextlib.contextmanager
def nothing_escapes():
    """Fails the test, instead of ending the run, when a BaseException that
    the test did not expect (a KeyboardInterrupt, a SystemExit...) escapes."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit, _faults.CustomBaseError) as e:
        pytest.fail(f"{type(e).__name__} escaped: {e!r}")


def fault_dataset(where, step, fault):
    """The dataset a fault test reads: 24 object ids (`_faults.sample_ids`)."""
    ids = _faults.sample_ids(24, fault)
    if step == "sample-loader":
        load = stack_samples(functools.partial(_faults.sample_loader, fault=fault))
    else:
        load = functools.partial(_faults.loader, fault=fault)
    if where == "LoaderDataset":
        return LoaderDataset(load, ids, batch_size=4)
    return PrefetchLoaderDataset(
        load, ids, batch_size=4, num_workers=2, start_method=where
    )


def expect_batch(ds, i):
    got = _faults.values(ds[i])
    np.testing.assert_array_equal(got, np.arange(4 * i, 4 * i + 4) * 2)


FAULT_CASES = [
    (where, step)
    for where in ("LoaderDataset", "fork", "subprocess")
    for step in _faults.STEPS
    if where != "LoaderDataset" or step in _faults.LOADER_STEPS
]
# Where the exception is raised in a worker, and must say so.
IN_WORKER = {"receive-request", "loader", "send-reply", "decorate", "sample-loader"}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("exc", sorted(_faults.CLASSES))
@pytest.mark.parametrize(("where", "step"), FAULT_CASES)
def test_a_fault_of_any_class_at_any_step_ends_only_its_read(
    tmp_path, where, step, exc
):
    """Kind C (issue 14, item 5 generalised): an exception of any class
    (`BaseException` subclasses and a frozen dataclass included), raised at
    any step of a read, ends that read with the user's own exception (a
    `RuntimeError` naming it when it cannot be rebuilt in the parent) and a
    note naming the batch; the next read of the same batch and of another
    one returns the right batch, and no worker is replaced. Before: hangs,
    `WorkerDiedError` for healthy workers, the exception escaping the pool,
    or `TypeError: Cannot add note` in place of the user's exception."""
    token = tmp_path / "fired"
    fault = _faults.Fault(step, exc, str(token), os.getpid())
    expected = RuntimeError if step == "receive-error" else _faults.CLASSES[exc]
    with nothing_escapes():
        ds = fault_dataset(where, step, fault)
        try:
            pids = None if where == "LoaderDataset" else ds.worker_pids
            expect_batch(ds, 0)
            with pytest.raises(expected) as info:
                ds[1]
            error = info.value
            assert type(error) is expected, repr(error)
            assert token.exists(), "the fault never fired"
            notes = [str(n) for n in getattr(error, "__notes__", [])]
            assert any("batch 1" in n for n in notes), notes
            if step == "receive-error":
                assert "UnrebuildableError" in str(error)
            if step in ("decorate", "sample-loader"):
                assert "a note of the loader's" in notes, notes
            if where != "LoaderDataset" and step in IN_WORKER:
                # Not to be taken for this process's own Ctrl-C or exit.
                assert any("raised in worker" in n for n in notes), notes
            expect_batch(ds, 1)
            expect_batch(ds, 2)
            if pids is not None:
                assert ds.worker_pids == pids, "a healthy worker was replaced"
        finally:
            if where != "LoaderDataset":
                ds.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_sample_ids_that_do_not_pickle_fail_their_batch_again_instead_of_hanging(
    start_method,
):
    """Kind C (issue 14, item 4): an object array of ids holding a
    `threading.Lock()`, which `LoaderDataset` reads: the first read raised
    `TypeError: cannot pickle`, the second read of the same batch hung
    forever (its key was marked held before the send failed)."""
    ids = np.empty(24, dtype=object)
    ids[:] = list(range(24))
    ids[5] = threading.Lock()

    np.testing.assert_array_equal(
        LoaderDataset(_faults.object_ids_loader, ids, batch_size=4)[1],
        [8, -2, 12, 14],
    )
    with PrefetchLoaderDataset(
        _faults.object_ids_loader,
        ids,
        batch_size=4,
        num_workers=2,
        start_method=start_method,
    ) as ds:
        pids = ds.worker_pids
        np.testing.assert_array_equal(ds[0], [0, 2, 4, 6])
        for _ in range(2):
            with pytest.raises(TypeError, match="cannot pickle") as info:
                ds[1]
            notes = " ".join(getattr(info.value, "__notes__", []))
            assert "batch 1" in notes and "sample ids" in notes, notes
        np.testing.assert_array_equal(ds[2], [16, 18, 20, 22])
        np.testing.assert_array_equal(ds[0], [0, 2, 4, 6])
        assert ds.worker_pids == pids


@pytest.mark.timeout(20)
@pytest.mark.parametrize("where", ["LoaderDataset", "stack_samples", "fork"])
def test_a_loader_exception_that_refuses_notes_arrives_as_itself(tmp_path, where):
    """Kind C (issue 14, item 5): a frozen dataclass exception made
    `LoaderDataset` and `stack_samples` raise `FrozenInstanceError`, and the
    pool report `WorkerDiedError: ... stopped responding` (replacing a
    healthy worker) for an exception whose `__notes__` is a tuple."""
    step = "sample-loader" if where == "stack_samples" else "decorate"
    for exc in ("FrozenError", "ValueError"):
        token = tmp_path / exc
        fault = _faults.Fault(step, exc, str(token), os.getpid())
        ds = fault_dataset("fork" if where == "fork" else "LoaderDataset", step, fault)
        try:
            pids = ds.worker_pids if where == "fork" else None
            with pytest.raises(_faults.CLASSES[exc]) as info:
                ds[1]
            assert type(info.value) is _faults.CLASSES[exc]
            notes = [str(n) for n in info.value.__notes__]
            assert notes[:2] == ["a note of the loader's", "42"], notes
            assert any("keras_oom: while loading batch 1" in n for n in notes)
            expect_batch(ds, 1)
            if pids is not None:
                assert ds.worker_pids == pids
        finally:
            if where == "fork":
                ds.close()


# -- dying and stuck workers ------------------------------------------------------


def test_worker_exit_raises_worker_died_error_and_is_replaced():
    with PrefetchLoaderDataset(
        faulty({9: "exit3"}), IDS, batch_size=4, num_workers=2
    ) as ds:
        before = ds.worker_pids  # batch 2 may be loaded (and die) ahead
        expect(ds, 0)
        expect(ds, 1)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError) as info:
            ds[2]
        assert time.monotonic() - start < 5
        error = info.value
        assert isinstance(error, RuntimeError)
        assert error.exitcode == 3
        assert error.batch_index == 2
        assert error.pid in before
        message = str(error)
        assert str(error.pid) in message
        assert "code 3" in message
        assert "batch 2" in message
        # Later batches load; the dead worker was replaced, the pool kept its size.
        for i in range(3, len(ds)):
            expect(ds, i)
        after = ds.worker_pids
        assert len(after) == 2
        assert error.pid not in after
        assert not _procs.alive(error.pid)


def test_sigkilled_worker_raises_worker_died_error(tmp_path):
    pidfile = tmp_path / "sleeper"
    with PrefetchLoaderDataset(
        faulty({9: "sleep"}, pidfile), IDS, batch_size=4, num_workers=2
    ) as ds:
        expect(ds, 0)
        expect(ds, 1)  # batch 2 is now loading ahead, and sleeping
        victim = int(_procs.wait_for_file(pidfile))
        assert victim in ds.worker_pids
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError) as info:
            ds[2]
        assert time.monotonic() - start < 5
        error = info.value
        assert error.pid == victim
        assert error.exitcode == -9
        assert error.batch_index == 2
        assert "SIGKILL" in str(error)
        assert "-9" in str(error)
        for i in range(3, len(ds)):
            expect(ds, i)
        assert victim not in ds.worker_pids
        assert len(ds.worker_pids) == 2


def _wait_for_lines(path, n, timeout=20.0):
    """Waits until the loader log at `path` has at least `n` batches."""
    deadline = time.monotonic() + timeout
    while len(_procs.read_log(path)) < n:
        assert time.monotonic() < deadline, f"{path}: {_procs.read_log(path)}"
        time.sleep(0.02)


def test_idle_worker_killed_is_replaced_silently(tmp_path):
    log = tmp_path / "loaded"
    loader = functools.partial(_procs.logging_loader, path=log)
    with PrefetchLoaderDataset(loader, IDS, batch_size=4) as ds:
        for i in range(len(ds)):
            ds[i]
        ds.on_epoch_end()
        # Idle: the workers loaded the epoch and the next epoch's window.
        _wait_for_lines(log, len(ds) + ds.num_workers)
        victim = ds.worker_pids[0]
        os.kill(victim, signal.SIGKILL)
        assert _procs.wait_gone([victim]) == []
        # Whatever batch it held is either served or reported; then all load.
        for i in range(len(ds)):
            try:
                got = ds[i]
            except WorkerDiedError:
                got = ds[i]
            np.testing.assert_array_equal(got, IDS[4 * i : 4 * i + 4] * 2)


def test_timeout_raises_worker_timeout_error_and_recovers():
    with PrefetchLoaderDataset(
        faulty({9: "sleep"}),
        IDS,
        batch_size=4,
        num_workers=2,
        timeout=0.5,
    ) as ds:
        expect(ds, 0)
        expect(ds, 1)
        start = time.monotonic()
        with pytest.raises(WorkerTimeoutError) as info:
            ds[2]
        assert time.monotonic() - start < 5
        assert isinstance(info.value, TimeoutError)
        assert "timeout=0.5" in str(info.value)
        assert "batch 2" in str(info.value)
        for i in range(3, len(ds)):
            expect(ds, i)
        assert len(ds.worker_pids) == 2


def test_a_worker_slower_to_start_than_timeout_serves_every_batch(tmp_path):
    """Kind B: a worker's start-up does not count against `timeout`.

    The loader takes 2 s to unpickle in a fresh worker (say, it loads a
    lookup table) while `timeout=1` bounds each batch. The worker is given
    its start-up (it used to be killed for it, and the pool left `ds[i]`
    spinning); every batch loads, and nothing hangs.
    """
    code = """
import time
import numpy as np
from keras_oom import PrefetchLoaderDataset

def _rebuild():
    time.sleep(2)  # expensive worker set-up
    return SlowToUnpickle()

class SlowToUnpickle:
    def __call__(self, ids):
        return ids * 2
    def __reduce__(self):
        return (_rebuild, ())

if __name__ == "__main__":
    ds = PrefetchLoaderDataset(
        SlowToUnpickle(), np.arange(20), batch_size=4, num_workers=1,
        start_method="subprocess", timeout=1.0,
    )
    for i in range(3):
        try:
            print("BATCH", i, ds[i].tolist(), flush=True)
        except Exception as e:
            print("RAISED", i, type(e).__name__, e, flush=True)
    ds.close()
    print("DONE", flush=True)
"""
    try:
        result = _procs.run_script(tmp_path, code, timeout=20)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"ds[i] hung once the pool had lost its workers: {e.stdout!r}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "BATCH 0 [0, 2, 4, 6]",
        "BATCH 1 [8, 10, 12, 14]",
        "BATCH 2 [16, 18, 20, 22]",
        "DONE",
    ], result.stdout


# -- shutdown --------------------------------------------------------------------


def test_close_is_idempotent_and_ends_workers():
    ds = PrefetchLoaderDataset(_procs.ids_loader, IDS, batch_size=4)
    pids = ds.worker_pids
    assert all(_procs.alive(p) for p in pids)
    assert not ds.closed
    ds.close()
    assert ds.closed
    ds.close()
    assert ds.closed
    assert _procs.wait_gone(pids) == []
    with pytest.raises(DatasetClosedError, match="closed") as info:
        ds[0]
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(DatasetClosedError):
        ds.worker_pids  # noqa: B018
    with pytest.raises(DatasetClosedError), ds:
        pass


@pytest.mark.timeout(20)  # a close() that waited for the loader: 60 s
def test_close_does_not_wait_for_a_loader_that_sleeps(tmp_path):
    """Kind D: close() ends workers whose loader sleeps for a minute instead
    of waiting for it (a hang is the failure: the timeout mark bounds it)."""
    pidfile = tmp_path / "sleeper"
    ds = PrefetchLoaderDataset(
        faulty({1: "sleep", 5: "sleep"}, pidfile), IDS, batch_size=4, num_workers=2
    )
    pids = ds.worker_pids
    _procs.wait_for_file(pidfile)  # a worker is inside the sleeping loader
    sleeper = int(pidfile.read_text())
    ds.close()
    assert ds.closed
    assert _procs.wait_gone(pids) == []
    assert sleeper in pids


def test_with_block_closes_also_on_exception():
    with (
        pytest.raises(KeyError, match="boom"),
        PrefetchLoaderDataset(_procs.ids_loader, IDS, batch_size=4) as ds,
    ):
        pids = ds.worker_pids
        ds[0]
        raise KeyError("boom")
    assert ds.closed
    assert _procs.wait_gone(pids) == []
    with pytest.raises(DatasetClosedError, match="closed"):
        ds[1]


def test_garbage_collection_ends_workers():
    ds = PrefetchLoaderDataset(_procs.ids_loader, IDS, batch_size=4)
    ds[0]
    pids = ds.worker_pids
    del ds
    gc.collect()
    assert _procs.wait_gone(pids) == []


class OverridingDataset(PrefetchLoaderDataset):
    """A subclass that loads with its own load() instead of a loader."""

    def load(self, ids):
        return np.asarray(ids) * 3


def test_garbage_collection_ends_workers_of_a_load_subclass():
    ds = OverridingDataset(sample_ids=IDS, batch_size=4)
    np.testing.assert_array_equal(ds[1], IDS[4:8] * 3)
    pids = ds.worker_pids
    del ds
    gc.collect()
    left = _procs.wait_gone(pids)
    if left:  # do not leak them into later tests
        for obj in gc.get_objects():
            if isinstance(obj, OverridingDataset):
                obj.close()
    assert left == [], "dropping the last reference did not end the workers"


def test_interpreter_exit_without_close(tmp_path):
    code = """
import numpy as np
from keras_oom import PrefetchLoaderDataset

ds = PrefetchLoaderDataset(lambda ids: np.ones((len(ids), 8192)) * ids[:, None],
                           np.arange(64), batch_size=8, num_workers=2)
assert ds[0].shape == (8, 8192)
print("PIDS", *ds.worker_pids, flush=True)
"""
    start = time.monotonic()
    result = _procs.run_script(tmp_path, code, timeout=60)
    assert time.monotonic() - start < 10
    assert result.returncode == 0, result.stderr
    assert "resource_tracker" not in result.stderr
    assert "leaked" not in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    pids = _procs.parse_pids(result.stdout.strip().splitlines()[-1])
    assert len(pids) == 2
    assert _procs.wait_gone(pids) == []


@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_sigkill_of_the_parent_ends_the_workers(tmp_path, start_method):
    code = f"""
import os
import time
import numpy as np
from keras_oom import PrefetchLoaderDataset

def loader(ids):
    with open(os.path.join({str(tmp_path)!r}, f"entered.{{os.getpid()}}"), "w") as f:
        f.write("entered")  # the test waits for this, not for a sleep
    time.sleep(30)
    return ids

ds = PrefetchLoaderDataset(loader, np.arange(16), batch_size=4, num_workers=2,
                           start_method={start_method!r})
print("PIDS", *ds.worker_pids, flush=True)
time.sleep(60)
"""
    proc = _procs.popen_script(tmp_path, code)
    try:
        pids = _procs.parse_pids(proc.stdout.readline())
        assert len(pids) == 2
        deadline = time.monotonic() + 20
        while len(list(tmp_path.glob("entered.*"))) < 2:  # both in the loader
            assert time.monotonic() < deadline, "the workers never entered the loader"
            time.sleep(0.02)
        assert all(_procs.alive(p) for p in pids)
        proc.kill()
        proc.wait(10)
        left = _procs.wait_gone(pids, 2.0)
        assert left == [], {p: _procs.state(p) for p in left}
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
        for p in pids if "pids" in locals() else []:
            _procs.kill(p)


def test_ctrl_c_gives_one_keyboard_interrupt(tmp_path):
    code = """
import time
import numpy as np
from keras_oom import PrefetchLoaderDataset

def loader(ids):
    time.sleep(0.2)
    return ids * 2

ds = PrefetchLoaderDataset(loader, np.arange(400), batch_size=4, num_workers=2)
print("PIDS", *ds.worker_pids, flush=True)
n = 0
while True:
    for i in range(len(ds)):
        ds[i]
        n += 1
        if n == 3:
            print("LOOPING", flush=True)
    ds.on_epoch_end()
"""
    # A new session, so that SIGINT can go to the whole process group, as a
    # terminal's Ctrl-C does.
    proc = _procs.popen_script(tmp_path, code, start_new_session=True)
    try:
        pids = _procs.parse_pids(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "LOOPING"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert err.count("Traceback") == 1, err
    assert err.rstrip().splitlines()[-1] == "KeyboardInterrupt", err
    assert "keras_oom/worker.py" not in err
    assert _procs.wait_gone(pids) == []


# -- fork safety and start methods: test_launch.py ------------------------------


# -- resources -----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_no_resource_growth_over_many_epochs():
    shm_before = _procs.shm_files()
    maps_before = set(memfd_mappings())
    gc.collect()
    fds0, threads0 = _procs.open_fds(), threading.active_count()
    children0 = _procs.worker_descendants()
    ids = np.arange(256)
    ref_sum = {}
    with PrefetchLoaderDataset(
        _procs.big_loader, ids, batch_size=64, num_workers=2
    ) as ds:
        pids = ds.worker_pids
        seen = []
        for epoch in range(20):
            for i in range(len(ds)):
                batch = ds[i]
                assert batch.shape == (64, 4096)
                assert batch.dtype == np.float32
                ref_sum.setdefault(i, float(batch[:, 0].sum()))
                assert float(batch[:, 0].sum()) == ref_sum[i]
                del batch
            ds.on_epoch_end()
            gc.collect()
            if epoch == 1:
                assert _procs.shm_files() - shm_before == set()
            seen.append(
                (_procs.open_fds(), threading.active_count(), len(ds.worker_pids))
            )
        # Per worker: its socket, its sentinel, its pidfd, and one descriptor per
        # shared-memory buffer the parent maps (mmap keeps a dup). Buffers
        # are recycled: a worker holds those lent to batches still alive
        # (at most the window and the batch in use), one free, and the one
        # it fills. So descriptors stay under a fixed bound however many
        # epochs run; when a worker makes a spare buffer is timing.
        per_worker = 3 + 4
        assert max(s[0] for s in seen) <= fds0 + 2 * per_worker, seen
        assert {s[1] for s in seen} == {threads0}, seen
        assert {s[2] for s in seen} == {2}, seen
        assert ds.worker_pids == pids
        assert _procs.worker_descendants() - children0 == set(pids)
        # Shared-memory mappings stay bounded (buffers are recycled).
        assert len(memfd_mappings()) <= 16, memfd_mappings()
        assert _procs.shm_files() - shm_before == set()
    gc.collect()
    assert _procs.wait_gone(pids) == []
    assert _procs.open_fds() <= fds0
    assert threading.active_count() <= threads0
    assert set(memfd_mappings()) <= maps_before  # see test_transport's note
    assert _procs.shm_files() - shm_before == set()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_worker_killed_in_the_middle_of_its_reply_is_a_died_worker(
    tmp_path, start_method
):
    """Kind C (found by the differential test): a worker killed after its
    reply's header went out, before the descriptor that follows it. The
    read used to end with `EOFError` and a note blaming unpickling; the
    stream, not the batch, is what broke, so the read must end with
    `WorkerDiedError`, and the next read (a new worker) must work."""
    ds = PrefetchLoaderDataset(
        functools.partial(_faults.dying_mid_reply_loader, token=str(tmp_path / "died")),
        np.arange(8),
        batch_size=2,
        num_workers=1,
        start_method=start_method,
    )
    with ds:
        with pytest.raises(WorkerDiedError) as info:
            ds[0]
        assert "unpickled" not in "".join(getattr(info.value, "__notes__", []))
        for i in range(len(ds)):
            np.testing.assert_array_equal(ds[i][:, 0], [2 * i, 2 * i + 1])
