"""The worker process: its randomness, its errors, and `worker_init`.

What runs inside a worker (worker.py) seen from the caller: each batch draws
its own random stream even when workers are forked copies of one parent, a
loader's exception arrives as itself even when it cannot describe itself,
and `worker_init` runs exactly once per worker, or, if it raises, ends the
pool with its own error instead of a loop of restarts.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import time

import _procs
import numpy as np
import pytest

import keras_oom
from keras_oom import PrefetchLoaderDataset, WorkerDiedError, worker
from keras_oom.protocol import Load, Loaded, Ready, WorkerSetup, pack_ids
from keras_oom.shm_receive import BatchReader

pytestmark = pytest.mark.timeout(60)


def test_forked_workers_draw_a_different_random_stream_per_batch():
    # Forked workers inherit the parent's NumPy state: without reseeding,
    # worker 1's first draw repeats worker 0's.
    with PrefetchLoaderDataset(
        _procs.global_random_loader,
        np.arange(8),
        batch_size=1,
        num_workers=2,
        start_method="fork",
    ) as ds:
        draws = [tuple(ds[i].tolist()) for i in range(len(ds))]
    assert len(set(draws)) == len(draws), draws


@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_loader_exception_whose_str_raises_reaches_the_caller(start_method):
    with PrefetchLoaderDataset(
        _procs.bad_str_loader,
        np.arange(6),
        batch_size=1,
        num_workers=2,
        start_method=start_method,
    ) as ds:
        pids = set(ds.worker_pids)
        np.testing.assert_array_equal(ds[0], [0])
        with pytest.raises((_procs.BadStrError, RuntimeError)) as info:
            ds[3]
        # Not a dead worker: the loader's own error, or one describing it.
        assert not isinstance(info.value, WorkerDiedError), info.value
        if not isinstance(info.value, _procs.BadStrError):
            assert "BadStrError" in str(info.value)
        np.testing.assert_array_equal(ds[4], [4])
        assert set(ds.worker_pids) == pids  # no worker died


@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_worker_init_runs_once_per_worker_with_its_index(tmp_path, start_method):
    log = tmp_path / "init.log"
    with PrefetchLoaderDataset(
        _procs.ids_loader,
        np.arange(12),
        batch_size=2,
        num_workers=3,
        start_method=start_method,
        worker_init=functools.partial(_procs.record_init, path=str(log)),
    ) as ds:
        for _ in range(2):
            for i in range(len(ds)):
                ds[i]
            ds.on_epoch_end()
        pids = set(ds.worker_pids)
    calls = _procs.read_init_log(log)
    assert sorted(index for _, index in calls) == [0, 1, 2]
    assert {pid for pid, _ in calls} == pids


@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_raising_worker_init_gives_its_error_then_worker_start_error(
    tmp_path, start_method
):
    log = tmp_path / "init.log"
    ds = PrefetchLoaderDataset(
        _procs.ids_loader,
        np.arange(12),
        batch_size=2,
        num_workers=2,
        start_method=start_method,
        worker_init=functools.partial(_procs.raising_init, path=str(log)),
    )
    try:
        with pytest.raises(_procs.InitError) as info:
            ds[0]
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert "raising_init" in notes, notes  # the worker's traceback
        # Later reads fail at once, and no worker is started again.
        for i in range(4):
            with pytest.raises(keras_oom.WorkerStartError):
                ds[i % len(ds)]
    finally:
        ds.close()
    calls = len(_procs.read_init_log(log))
    assert 1 <= calls <= 2, calls  # at most one try per slot: no restart loop


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_worker_init_raising_a_base_exception_arrives_as_itself(tmp_path, start_method):
    """Kind C: a `BaseException` subclass from `worker_init` is the start's
    error, as an `Exception` is, not a worker that dies without a word."""
    log = tmp_path / "init.log"
    ds = PrefetchLoaderDataset(
        _procs.ids_loader,
        np.arange(12),
        batch_size=2,
        num_workers=2,
        start_method=start_method,
        worker_init=functools.partial(_procs.base_raising_init, path=str(log)),
    )
    try:
        with pytest.raises(_procs.InitAbort) as info:
            ds[0]
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert "base_raising_init" in notes, notes
        with pytest.raises(keras_oom.WorkerStartError):
            ds[1]
    finally:
        ds.close()
    assert 1 <= len(_procs.read_init_log(log)) <= 2


def _socket_inodes(pid: int) -> set[str]:
    """The sockets `pid` holds, as /proc names them (`socket:[inode]`)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


@pytest.mark.timeout(30)
def test_forked_worker_holds_no_parent_end_of_any_worker_socket():
    """Kind D (issue 14.6): a forked worker inherits every descriptor of the
    parent, its own socket's parent end included. Holding it, the worker
    never sees end-of-file when the parent lets go of it. Each worker must
    close every parent end it inherited, its own first."""
    with PrefetchLoaderDataset(
        _procs.ids_loader,
        np.arange(12),
        batch_size=2,
        num_workers=3,
        start_method="fork",
    ) as ds:
        for i in range(len(ds)):  # every worker has loaded a batch: it runs
            ds[i]
        pool = ds._engine.executor
        parent_ends = {
            os.readlink(f"/proc/self/fd/{w.conn.fileno()}")
            for w in pool._workers
            if w is not None
        }
        assert len(parent_ends) == 3
        for pid in ds.worker_pids:
            held = _socket_inodes(pid) & parent_ends
            assert not held, f"worker {pid} holds parent ends {held}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_worker_runs_in_a_process_group_of_its_own(start_method):
    """Kind D (issue 14.10): each worker leads a process group (and a
    session) of its own, so that the pool can end it together with every
    process its loader started, and a terminal's Ctrl-C reaches neither."""
    with PrefetchLoaderDataset(
        _procs.ids_loader,
        np.arange(8),
        batch_size=2,
        num_workers=2,
        start_method=start_method,
    ) as ds:
        ds[0]
        # ds[0] proves one worker ready; a forked one calls setsid() as it
        # starts, so wait (bounded) for each to get there.
        deadline = time.monotonic() + 20
        pids = ds.worker_pids
        while time.monotonic() < deadline:
            if all(os.getsid(pid) == pid for pid in pids):
                break
            time.sleep(0.01)
        for pid in pids:
            assert os.getpgid(pid) == pid
            assert os.getsid(pid) == pid


# -- worker.run itself, over a socket pair, as the pool runs it -------------------


def squares(ids):
    return np.asarray(ids) ** 2


def _start_run(setup):
    """Forks a process running `worker.run` on one end of a socket pair.

    Returns the process and the parent's end, as the pool holds them.
    """
    parent_end, child_end = multiprocessing.Pipe(duplex=True)
    process = multiprocessing.get_context("fork").Process(
        target=worker.run,
        # The fork copies the parent's end too: the worker closes it first.
        args=(child_end, setup, os.getpid(), 0, (parent_end.fileno(),)),
    )
    process.start()
    child_end.close()
    return process, parent_end


def _recv(conn, seconds: float = 10.0):
    assert conn.poll(seconds), f"no message from the worker within {seconds} s"
    return conn.recv()


@pytest.mark.timeout(30)
def test_run_answers_a_load_with_its_batch_and_exits_after_the_goodbye():
    """Issue 16, weak tests (`worker.run` never called): Ready, then the
    right batch for a Load, then exit 0 after the pool's goodbye."""
    process, conn = _start_run(WorkerSetup(squares, None))
    try:
        assert _recv(conn) == Ready(process.pid)
        ids = np.array([3, 1, 4])
        conn.send(Load((0, 2), pack_ids(ids), [], (7, 0, 2)))
        reply = _recv(conn)
        assert isinstance(reply, Loaded), reply
        assert reply.key == (0, 2)
        batch = BatchReader().receive(conn, reply.kind, reply.payload)
        np.testing.assert_array_equal(batch, [9, 1, 16])
        conn.send(None)  # the pool's goodbye
        process.join(10)
        assert process.exitcode == 0
    finally:
        conn.close()
        if process.is_alive():
            process.kill()
        process.join(10)


@pytest.mark.timeout(30)
def test_run_ends_when_the_parent_end_closes_without_a_goodbye():
    """Issue 16, weak tests (`worker.run` never called): a stream that just
    ends (the parent died) ends the worker, with its process group."""
    process, conn = _start_run(WorkerSetup(squares, None))
    try:
        assert _recv(conn) == Ready(process.pid)
        conn.close()  # the parent died, or gave up on this worker
        process.join(10)
        assert not process.is_alive()
        # It ends itself with its group (worker._end_group): SIGKILL.
        assert process.exitcode == -signal.SIGKILL
    finally:
        if process.is_alive():
            process.kill()
        process.join(10)
