"""How batches travel from a worker to the caller (keras_oom.transport).

A batch that comes back subtly different (dtype, shape, memory order, a
read-only array, or data overwritten by a later batch that reused a shared
buffer) would corrupt training without an error. These tests round-trip
batches of every awkward kind, both through the writer/reader pair over a
real Unix socket in this process (where the chosen path, inline or memfd,
can be inspected) and end to end through real worker processes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

import _procs
import _sample_loaders
import _zero_copy_loaders as zl
import numpy as np
import pytest

from keras_oom import (
    PrefetchLoaderDataset,
    WorkerDiedError,
    batch_array,
    shm,
    shm_receive,
    stack_samples,
    transport,
)
from keras_oom.protocol import Loaded
from keras_oom.transport import SHARED_MEMORY_THRESHOLD, BatchReader, BatchWriter

pytestmark = pytest.mark.timeout(60)


def assert_same(got, want):
    """Equal values, types, dtypes, shapes and memory order; arrays writable."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), type(got)
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        if want.dtype.hasobject:
            assert got.tolist() == want.tolist()
        else:
            np.testing.assert_array_equal(got, want)
        if want.ndim > 1 and want.flags.f_contiguous and not want.flags.c_contiguous:
            assert got.flags.f_contiguous
        assert got.flags.writeable
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    elif isinstance(want, dict):
        assert type(got) is dict and got.keys() == want.keys()
        for k in want:
            assert_same(got[k], want[k])
    else:
        assert type(got) is type(want)
        assert got == want


def array_nbytes(value) -> int:
    if isinstance(value, np.ndarray):
        # NumPy hands out only contiguous, non-object arrays out of band;
        # others are copied into the pickle stream.
        contiguous = value.flags.c_contiguous or value.flags.f_contiguous
        return value.nbytes if contiguous and not value.dtype.hasobject else 0
    if isinstance(value, (tuple, list)):
        return sum(array_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(array_nbytes(v) for v in value.values())
    return 0


def memfd_mappings() -> list[str]:
    """This process's mappings of keras_oom buffers.

    Tests compare them with what was mapped before they ran, not with none:
    under TensorFlow, a `fit` in an earlier test can leave tf.data holding
    its last batch (an array on one of these buffers) for the process's
    lifetime.
    """
    with open("/proc/self/maps") as f:
        return [line for line in f if "keras_oom_batch" in line]


def in_memfd(arr: np.ndarray) -> bool:
    """Whether `arr`'s data lies in a keras_oom shared-memory mapping."""
    address = arr.__array_interface__["data"][0]
    for line in memfd_mappings():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= address < end:
            return True
    return False


class Channel:
    """A writer and a reader joined by a Unix socket, in this process."""

    def __init__(self):
        a, b = socket.socketpair()
        self.worker_end = Connection(a.detach())
        self.parent_end = Connection(b.detach())
        self.writer = BatchWriter()
        self.reader = BatchReader()
        self.payloads = []

    def roundtrip(self, value):
        """Sends `value`, which the caller keeps; returns (kind, received)."""
        message = functools.partial(Loaded, "key", 0.5, 0.0)
        return self._exchange(lambda: self.writer.send(self.worker_end, message, value))

    def load(self, loader):
        """Sends what `loader()` returns as the worker loop does, holding no
        reference to it between preparing and transmitting the batch."""
        message = functools.partial(Loaded, "key", 0.5, 0.0)

        def send():
            outgoing = self.writer.prepare(message, loader())
            self.writer.transmit(self.worker_end, outgoing)

        return self._exchange(send)

    def _exchange(self, do_send):
        self.writer.release(self.reader.take_released())
        errors = []

        def send():
            try:
                do_send()
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        sender = threading.Thread(target=send)  # big inline pickles block
        sender.start()
        msg = self.parent_end.recv()
        kind, payload = msg.kind, msg.payload
        received = self.reader.receive(self.parent_end, kind, payload)
        sender.join(10)
        assert not errors, errors
        assert isinstance(msg, Loaded) and (msg.key, msg.seconds) == ("key", 0.5)
        self.payloads.append((kind, payload))
        return kind, received

    def close(self):
        self.worker_end.close()
        self.parent_end.close()


@pytest.fixture
def channel():
    ch = Channel()
    yield ch
    ch.close()


@pytest.mark.parametrize("k", range(_procs.N_CASES))
def test_roundtrip_in_process(channel, k):
    value = _procs.make_case(k)
    kind, got = channel.roundtrip(value)
    assert_same(got, value)
    big = array_nbytes(value) >= SHARED_MEMORY_THRESHOLD
    if os.name == "posix" and hasattr(os, "memfd_create"):
        assert kind == ("memfd" if big else "inline")


def test_large_arrays_are_views_of_shared_memory(channel):
    value = {"x": np.arange(2 * _procs.MIB // 8, dtype=np.float64), "y": np.ones(3)}
    kind, got = channel.roundtrip(value)
    assert kind == "memfd"
    assert in_memfd(got["x"])
    np.testing.assert_array_equal(got["x"], value["x"])
    got["x"][:10] = -1  # writable, and only the caller's copy changes
    assert value["x"][0] == 0


def test_held_batch_survives_later_batches(channel):
    first_value = np.full((256, 1024), 1.0, np.float32)
    _, first = channel.roundtrip(first_value)
    view = first[10:20]
    for i in range(2, 11):
        _, later = channel.roundtrip(np.full((256, 1024), float(i), np.float32))
        assert later[0, 0] == i
        del later
        gc.collect()
    np.testing.assert_array_equal(first, first_value)
    np.testing.assert_array_equal(view, first_value[10:20])


def test_views_keep_their_buffer_lent(channel):
    _, batch = channel.roundtrip(np.full((256, 1024), 7.0, np.float32))
    row = batch[3]  # a view outlives the batch
    del batch
    gc.collect()
    for i in range(5):
        _, later = channel.roundtrip(np.full((256, 1024), float(i), np.float32))
        del later
        gc.collect()
    assert (row == 7.0).all()


def test_released_buffers_are_reused(channel):
    for i in range(6):
        kind, batch = channel.roundtrip(np.full((256, 1024), float(i), np.float32))
        assert kind == "memfd"
        assert batch[0, 0] == i
        del batch
        gc.collect()
    new_buffers = [b for _, p in channel.payloads for b in p[2]]
    # After the first batch or two, freed buffers are recycled: no new file.
    assert len(new_buffers) <= 2, channel.payloads


def test_no_mapping_outlives_the_reader_and_its_arrays():
    before = set(memfd_mappings())  # see memfd_mappings
    ch = Channel()
    batches = [ch.roundtrip(np.ones((256, 1024), np.float32))[1] for _ in range(3)]
    assert len(memfd_mappings()) >= 3  # the worker's maps and the parent's
    ch.close()
    del ch, batches
    gc.collect()
    assert set(memfd_mappings()) <= before


def in_forked_child(check) -> str:
    """Runs `check()` in a forked child; returns the text it returned.

    The child reports through a pipe and leaves with `os._exit`, so nothing
    of pytest runs there. A crash (a segfault on touching a forgotten
    mapping) shows up as the child's signal, not as a hang.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(r)
            try:
                text = check()
            except BaseException as e:
                text = f"ERROR {type(e).__name__}: {e}"
            os.write(w, text.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"child died of signal {os.WTERMSIG(status)}"
    return text


@pytest.mark.timeout(30)
def test_a_forked_child_keeps_the_values_and_maps_no_shared_file(channel):
    """Kind A (issue 14, item 2): what a fork keeps of the parent's batches.

    A forked child (a worker, or the user's own) must neither pin the
    workers' files nor see their later writes, yet read the values its
    parent held at the fork: held arrays become private copies there, and
    mappings no array uses are unmapped. Covers a mapping the reader still
    holds, one only a caller's array holds (the reader is gone), and the
    writer's own buffers. (It used to give the child zero pages.)
    """
    _, held = channel.roundtrip(np.full((256, 1024), 3.0, np.float32))
    _, orphan = channel.roundtrip(np.full((256, 1024), 5.0, np.float32))
    channel.reader = BatchReader()  # `orphan` alone keeps its mapping now
    gc.collect()
    assert in_memfd(held) and in_memfd(orphan)
    assert len(memfd_mappings()) >= 3  # writer's and reader's

    def check():
        left = memfd_mappings()  # the at-fork hook has run already
        kept = (held == 3.0).all() and (orphan == 5.0).all()
        held[0, 0] = 1.0  # and writes stay in the child
        transport.forget_inherited_mappings()  # again: nothing left to do
        return f"{len(left)} {kept} {held[0, 0]} {held.shape}"

    assert in_forked_child(check) == "0 True 1.0 (256, 1024)"
    # The parent's batches and mappings are untouched.
    assert (held == 3.0).all() and (orphan == 5.0).all()
    assert in_memfd(held) and in_memfd(orphan)
    # And the parent keeps working through the same buffers.
    _, later = channel.roundtrip(np.full((256, 1024), 9.0, np.float32))
    assert (later == 9.0).all() and in_memfd(later)


@pytest.mark.timeout(30)
def test_forgetting_mappings_already_gone_is_a_no_op():
    ch = Channel()
    ch.roundtrip(np.ones((256, 1024), np.float32))
    ch.writer.release([0])
    ch.close()
    del ch
    gc.collect()

    def check():
        result = transport.forget_inherited_mappings()
        return f"{result} {len(memfd_mappings())}"

    assert in_forked_child(check) == "None 0"


@pytest.mark.timeout(90)
def test_roundtrip_through_real_workers():
    before = set(memfd_mappings())
    ids = np.arange(_procs.N_CASES)
    with PrefetchLoaderDataset(
        _procs.case_loader, ids, batch_size=1, num_workers=2
    ) as ds:
        held = []
        for epoch in range(2):
            for i in range(len(ds)):
                got, want = ds[i], _procs.make_case(i)
                assert_same(got, want)
                if epoch == 0:
                    held.append(got)
            ds.on_epoch_end()
        # Batches held from the first epoch were not overwritten by the second.
        for i, got in enumerate(held):
            assert_same(got, _procs.make_case(i))
        big = ds[11]  # a 1 MiB float32 array: through shared memory
        assert in_memfd(big)
        del big, held, got
    gc.collect()
    assert set(memfd_mappings()) <= before


@pytest.mark.skipif(
    os.environ.get("KERAS_OOM_SLOW") != "1",
    reason="1 GiB round trip; set KERAS_OOM_SLOW=1 to run it",
)
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_gib_array(channel):
    value = np.ones((1 << 28,), np.float32)  # 1 GiB
    value[::4096] = np.arange(len(value[::4096]), dtype=np.float32)
    kind, got = channel.roundtrip(value)
    assert kind == "memfd"
    assert got.shape == value.shape and got.dtype == value.dtype
    np.testing.assert_array_equal(got[::4096], value[::4096])
    assert got[-1] == value[-1]


# -- zero-copy batches: arrays made by batch_array in a worker ---------------


@pytest.fixture
def worker_channel(channel, monkeypatch):
    """A channel whose writer serves `batch_array` in this process, as a worker's."""
    monkeypatch.setattr(transport, "_ACTIVE", None)
    channel.writer.activate()
    return channel


def mapping_of(arr: np.ndarray) -> tuple[str, int]:
    """(inode of the mapped file, offset of `arr`'s data in that file)."""
    address = arr.__array_interface__["data"][0]
    for line in memfd_mappings():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[4], int(fields[2], 16) + address - start
    raise AssertionError("not in a keras_oom mapping")


def test_batch_array_crosses_with_no_copy(worker_channel):
    made = {}

    def loader():
        out = batch_array((768, 4096), np.float32)  # 12 MiB
        out[:] = np.arange(4096, dtype=np.float32)
        made.update(
            where=mapping_of(out),
            address=out.__array_interface__["data"][0],
            want=out.copy(),
        )
        return out

    kind, got = worker_channel.load(loader)
    assert kind == "memfd"
    assert_same(got, made["want"])
    writer = worker_channel.writer
    assert writer.copied_bytes == 0 and writer.private_bytes == 0
    assert writer.in_place_bytes == got.nbytes
    # The parent's array is the worker's: same shared file, same offset.
    assert mapping_of(got) == made["where"]
    assert got.__array_interface__["data"][0] != made["address"]
    _, (data, parts, _, _) = worker_channel.payloads[-1]
    assert isinstance(data, bytes)  # the small pickle rides in the message
    assert parts == [(parts[0][0], 0, got.nbytes)]


def test_views_and_mixed_batches_copy_only_what_is_not_in_place(worker_channel):
    made = {}

    def loader():
        out = batch_array((256, 1024), np.float32)
        out[:] = 4.0
        other = np.full((256, 1024), 2.0, np.float32)  # plain memory: copied once
        value = {"x": out[:100], "other": other, "small": np.arange(3)}
        made.update(where=mapping_of(out), want={k: v.copy() for k, v in value.items()})
        return value

    kind, got = worker_channel.load(loader)
    assert kind == "memfd"
    want = made["want"]
    assert_same(got, want)
    writer = worker_channel.writer
    assert writer.in_place_bytes == want["x"].nbytes
    assert writer.copied_bytes == want["other"].nbytes + want["small"].nbytes
    assert writer.private_bytes == 0
    assert mapping_of(got["x"]) == made["where"]
    assert in_memfd(got["other"]) and mapping_of(got["other"]) != made["where"]


def test_small_batch_arrays_are_plain_memory(worker_channel):
    out = batch_array((4, 4), np.float32)
    assert out.flags.owndata and not in_memfd(out)
    kind, _ = worker_channel.roundtrip(out)
    assert kind == "inline"


def test_batch_array_buffers_are_reused_and_bounded(worker_channel):
    held = []
    for i in range(40):

        def loader(i=i):
            out = batch_array((256, 1024), np.float32)
            out[:] = i
            return out  # and lets go of it, as the worker loop does

        kind, got = worker_channel.load(loader)
        assert kind == "memfd" and got[0, 0] == i
        if i % 10 == 0:
            held.append((i, got))  # a few batches the caller keeps
        del got  # reference counting frees it: no gc.collect() needed
    for i, got in held:  # never overwritten by later batches
        assert (got == i).all()
    writer = worker_channel.writer
    assert writer.copied_bytes == 0 and writer.private_bytes == 0
    new_buffers = [b for _, p in worker_channel.payloads for b in p[2]]
    # 4 held batches + about 2 in rotation; not one buffer per batch.
    assert len(new_buffers) <= 7, new_buffers
    assert len(writer._maps) <= len(held) + 3


def test_a_dropped_batch_array_returns_its_buffer(worker_channel):
    writer = worker_channel.writer
    out = batch_array((256, 1024), np.float32)
    (buffer_id,) = writer._maps
    assert buffer_id not in writer._free
    del out  # the loader built its batch, then returned something else
    kind, got = worker_channel.roundtrip(np.ones(3))
    assert kind == "inline"
    assert buffer_id in writer._free
    again = batch_array((256, 1024), np.float32)
    assert list(writer._maps) == [buffer_id]  # reused, no new buffer
    assert again.shape == (256, 1024)


def test_a_batch_array_the_loader_keeps_is_not_reused(worker_channel):
    writer = worker_channel.writer
    kept = batch_array((256, 1024), np.float32)
    kept[:] = 1.0
    worker_channel.roundtrip(np.ones(3))  # a batch without it
    later = batch_array((256, 1024), np.float32)
    later[:] = 2.0
    assert mapping_of(later)[0] != mapping_of(kept)[0]
    assert (kept == 1.0).all() and len(writer._maps) == 2


def filled(value: float):
    """A loader of one `batch_array` filled with `value`, kept by no one."""

    def loader():
        out = batch_array((256, 1024), np.float32)
        out[:] = value
        return out

    return loader


def test_a_batch_array_sent_and_kept_by_both_sides_stays_lent(worker_channel):
    _, got = worker_channel.load(filled(3.0))  # the caller holds `got`
    for i in range(5):
        _, later = worker_channel.load(filled(i))
        del later
        gc.collect()
    assert (got == 3.0).all()
    assert worker_channel.writer.private_bytes == 0


@pytest.mark.timeout(90)
def test_batch_array_through_real_workers():
    before = set(memfd_mappings())
    ids = np.arange(32)
    with PrefetchLoaderDataset(
        _sample_loaders.kept_batch_loader, ids, batch_size=8, num_workers=2
    ) as ds:
        for _ in range(2):
            batches = [ds[i] for i in range(len(ds))]
            ds.on_epoch_end()
        for i, batch in enumerate(batches):
            assert (batch == np.arange(8 * i, 8 * i + 8)[:, None, None, None]).all()
            assert batch.flags.writeable
            # In place: at the very start of a worker's buffer, where
            # batch_array put it, not copied behind a pickle.
            assert mapping_of(batch)[1] == 0
        del batches, batch
    gc.collect()
    assert set(memfd_mappings()) <= before


def memfd_inodes(pid: int | str = "self") -> set[int]:
    """Inodes of the keras_oom shared-memory buffers that `pid` maps."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = [line for line in f if "keras_oom_batch" in line]
    except (FileNotFoundError, ProcessLookupError):
        return set()
    return {int(line.split()[4]) for line in lines}


def assert_forgets(pid: int, inodes: set[int]) -> None:
    """Polls until worker `pid` maps none of `inodes`; fails after 10 s.

    A worker just forked may still be starting: it forgets what it
    inherited first thing, but only once it runs.
    """
    deadline = time.monotonic() + 10
    while memfd_inodes(pid) & inodes:
        assert time.monotonic() < deadline, (pid, memfd_inodes(pid) & inodes)
        time.sleep(0.02)


@pytest.mark.timeout(60)
def test_workers_of_one_dataset_do_not_map_another_datasets_batches():
    ids = np.arange(64)
    with PrefetchLoaderDataset(  # 256 KiB batches: through shared memory
        _procs.big_loader, ids, batch_size=16, num_workers=2, start_method="fork"
    ) as a:
        held = [a[i] for i in range(len(a))]  # a's batches, mapped here
        assert all(in_memfd(x) for x in held)
        mine = memfd_inodes()
        assert mine
        with PrefetchLoaderDataset(
            _procs.ids_loader, ids, batch_size=8, num_workers=2, start_method="fork"
        ) as b:
            b[0]  # b's workers are running, forked after a's batches arrived
            for pid in b.worker_pids:
                assert_forgets(pid, mine)
            # A replacement worker, forked later, forgets them too.
            victim = b.worker_pids[0]
            _procs.kill(victim)
            assert _procs.wait_gone([victim]) == []
            deadline, i = time.monotonic() + 10, 0
            while victim in b.worker_pids or len(b.worker_pids) < 2:
                assert time.monotonic() < deadline, b.worker_pids
                # Reads of new batches let the pool see the death and replace
                # the worker (re-reads of batches 0 and 1 may come from a cache).
                i = (i + 1) % len(b)
                if i == 0:
                    b.on_epoch_end()
                with contextlib.suppress(WorkerDiedError):  # its batch, if any
                    b[i]
            for pid in b.worker_pids:
                assert_forgets(pid, mine)
        del held


# -- issue 14: arrays that change under their holder, and held batches -------


def read_all(ds) -> list:
    return [ds[i] for i in range(len(ds))]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "loader",
    [
        zl.refilled_loader,
        zl.refilled_view_loader,
        zl.ring_loader,
        zl.twice_loader,
    ],
)
def test_a_batch_array_the_loader_keeps_does_not_change_lent_batches(loader):
    """Kind A (issue 14, item 1): a loader keeps one `batch_array` and refills it.

    Before, the worker sent the kept array in place at every batch, so every
    batch the caller held was the same shared memory: batch i read the ids
    of the last batch loaded. Covers the kept array itself, a view of it, a
    ring of two slots in one kept array, and the same array twice in a batch.
    """
    ids = np.arange(24)
    with PrefetchLoaderDataset(loader, ids, batch_size=4, num_workers=1) as ds:
        held = read_all(ds)
        for i, batch in enumerate(held):
            want = zl.expected(ids[4 * i : 4 * i + 4])
            if isinstance(batch, dict):
                assert batch.keys() == {"a", "b"}
                np.testing.assert_array_equal(batch["a"], want, err_msg=f"batch {i}")
                np.testing.assert_array_equal(batch["b"], want, err_msg=f"batch {i}")
            else:
                np.testing.assert_array_equal(batch, want, err_msg=f"batch {i}")
        del held, batch


@pytest.mark.timeout(90)
def test_a_kept_batch_array_under_a_fresh_interpreter_worker():
    """Kind A (issue 14, item 1): the same, with workers that are not forked."""
    ids = np.arange(24)
    with PrefetchLoaderDataset(
        zl.refilled_loader, ids, batch_size=4, num_workers=1, start_method="subprocess"
    ) as ds:
        held = read_all(ds)
        for i, batch in enumerate(held):
            np.testing.assert_array_equal(batch, zl.expected(ids[4 * i : 4 * i + 4]))
        del held, batch


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loader", [zl.constant_loader, zl.fresh_loader])
def test_writing_into_a_received_batch_changes_no_other_batch(loader):
    """Kind A (issue 14, item 1, the caller's side): `x /= 255` on a batch.

    A loader that returns the same kept array every batch (a constant
    built once) shared it with the caller, so dividing one batch in place
    divided the loader's array, and with it every later batch.
    """
    ids = np.arange(24)
    with PrefetchLoaderDataset(loader, ids, batch_size=4, num_workers=1) as ds:
        held = []
        for i in range(len(ds)):
            x = ds[i]
            x /= 255
            held.append(x)
        for i, x in enumerate(held):
            if loader is zl.constant_loader:
                want = zl.constant_value() / np.float32(255)
            else:
                want = zl.expected(ids[4 * i : 4 * i + 4]) / np.float32(255)
            np.testing.assert_array_equal(x, want, err_msg=f"batch {i}")
        del held, x


@pytest.mark.timeout(60)
def test_a_batch_array_kept_in_worker_init_globals_is_copied():
    """Kind A (issue 14, item 1): an array kept in `worker_init`'s globals.

    `worker_init` runs before the worker serves batches, so its
    `batch_array` is plain memory, and each batch is a copy of it.
    """
    ids = np.arange(24)
    with PrefetchLoaderDataset(
        zl.init_kept_loader,
        ids,
        batch_size=4,
        num_workers=1,
        worker_init=zl.init_kept,
    ) as ds:
        held = read_all(ds)
        for i, batch in enumerate(held):
            np.testing.assert_array_equal(batch, zl.expected(ids[4 * i : 4 * i + 4]))
        del held, batch


@pytest.mark.timeout(90)
def test_held_stacked_batches_from_threads_keep_their_values():
    """Kind A (issue 14, item 1): `stack_samples` with threads, batches held."""
    ids = np.arange(48)
    loader = stack_samples(zl.sample_row, threads=3)
    with PrefetchLoaderDataset(loader, ids, batch_size=4, num_workers=2) as ds:
        held = read_all(ds)
        ds.on_epoch_end()
        again = read_all(ds)  # the workers load every batch a second time
        for i, (batch, second) in enumerate(zip(held, again, strict=True)):
            want = zl.expected(ids[4 * i : 4 * i + 4])
            np.testing.assert_array_equal(batch, want)
            np.testing.assert_array_equal(second, want)
        assert in_memfd(held[-1])
        del held, again, batch, second


def test_a_kept_batch_array_is_sent_in_place_once_then_copied(worker_channel):
    """Kind A (issue 14, item 1), in one process: what the writer does.

    The first send of a kept array goes in place; the worker's own view of
    the buffer then becomes private memory, so refilling it changes nothing
    the parent holds, and later sends of it are ordinary copies.
    """
    kept = batch_array((256, 1024), np.float32)
    got = []
    for i in range(3):
        kept[:] = i
        got.append(worker_channel.roundtrip(kept)[1])
    for i, g in enumerate(got):
        assert (g == i).all(), (i, g[0, 0])
    writer = worker_channel.writer
    assert writer.in_place_bytes == kept.nbytes
    assert writer.copied_bytes == 2 * kept.nbytes
    assert not in_memfd(kept)  # the worker's view is private memory now
    assert (kept == 2).all()


def test_a_fresh_batch_array_per_batch_is_never_copied(worker_channel):
    """Kind A (issue 14, item 1) guard: the common case keeps its speed, with
    nothing copied and buffers recycled."""
    for i in range(10):

        def loader(i=i):
            out = batch_array((256, 1024), np.float32)
            out[:] = i
            return out

        kind, got = worker_channel.load(loader)
        assert kind == "memfd" and (got == i).all()
        del got
        gc.collect()
    writer = worker_channel.writer
    assert writer.copied_bytes == 0 and writer.private_bytes == 0
    assert writer.in_place_bytes == 10 * 256 * 1024 * 4
    new_buffers = [b for _, p in worker_channel.payloads for b in p[2]]
    assert len(new_buffers) <= 2, new_buffers


# -- issue 14, item 2: zero-copy arrays in forked processes -------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
@pytest.mark.parametrize("close_a", [False, True], ids=["a_open", "a_closed"])
def test_a_captured_zero_copy_array_reaches_another_datasets_workers(
    start_method, close_a
):
    """Kind A (issue 14, item 2): dataset B's loader captures a row of A's batch.

    Forked workers of B used to read the row as zeros: every inherited
    mapping was replaced by zero pages. They must see the values the parent
    had when it forked them, whether A is still open or closed.
    """
    ids = np.arange(16)
    a = PrefetchLoaderDataset(zl.fresh_loader, ids, batch_size=4, num_workers=1)
    try:
        row = a[1][2]  # sample 6's row, a view of A's shared memory
        assert in_memfd(row)
    finally:
        if close_a:
            a.close()
    want = float(row.sum(dtype=np.float64))
    assert want == 6 * zl.ROW
    try:
        with PrefetchLoaderDataset(
            functools.partial(zl.row_sums, row),
            ids,
            batch_size=4,
            num_workers=1,
            start_method=start_method,
        ) as b:
            for i in range(len(b)):
                np.testing.assert_array_equal(b[i], np.full(4, want))
    finally:
        a.close()
    assert (row == 6).all()  # and the parent's array is untouched


class ForkedChild:
    """A forked child that runs `check()` once told to go, and reports it.

    It leaves when the parent says go or closes its end (a failing test
    reaps it too), so it never outlives the test.
    """

    def __init__(self, check):
        go_r, self._go = os.pipe()
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - runs in the child
            try:
                os.close(r)
                os.close(self._go)
                try:
                    os.read(go_r, 1)
                    text = check()
                except BaseException as e:
                    text = f"ERROR {type(e).__name__}: {e}"
                os.write(w, text.encode())
            finally:
                os._exit(0)
        os.close(go_r)
        os.close(w)
        self._out = os.fdopen(r, "rb")

    def result(self) -> str:
        """Tells the child to go; returns what `check()` returned."""
        os.write(self._go, b"x")
        return self.close()

    def close(self) -> str:
        if self._go >= 0:
            os.close(self._go)
            self._go = -1
        with self._out:
            text = self._out.read().decode()
        _, status = os.waitpid(self.pid, 0)
        assert os.WIFEXITED(status), f"child died of signal {os.WTERMSIG(status)}"
        return text


@pytest.mark.timeout(60)
def test_a_users_forked_child_keeps_a_batch_the_worker_reuses():
    """Kind A (issue 14, item 2): the user's own `os.fork()` child.

    The child holds a batch received before the fork; the parent drops it
    and the worker reuses its buffer for a later batch. The child must
    still read the values of the moment of the fork.
    """
    ids = np.arange(64)
    with PrefetchLoaderDataset(zl.fresh_loader, ids, batch_size=4, num_workers=1) as ds:
        box = [ds[0]]
        inode = mapping_of(box[0])[0]
        child = ForkedChild(lambda: str(bool((box[0] == zl.expected(ids[:4])).all())))
        try:
            box.clear()  # the parent drops the batch; the child still holds it
            gc.collect()
            # Read on until a batch lands in the dropped batch's buffer.
            for i in range(1, len(ds)):
                if mapping_of(ds[i])[0] == inode:
                    break
            else:
                raise AssertionError("the worker never reused the buffer")
            assert child.result() == "True"
        finally:
            if child._go >= 0:
                child.close()


@pytest.mark.timeout(60)
def test_a_child_forked_while_nothing_is_held_maps_no_worker_file():
    """Kind A / D (issue 14, item 2): the fork pins none of the worker's files."""
    ids = np.arange(32)
    with PrefetchLoaderDataset(zl.fresh_loader, ids, batch_size=4, num_workers=1) as ds:
        for i in range(len(ds)):
            assert ds[i][0, 0] == 4 * i
        gc.collect()
        mine = memfd_inodes()
        assert mine  # the parent still maps the worker's buffers, to reuse them
        assert in_forked_child(lambda: str(sorted(memfd_inodes()))) == "[]"


# -- issue 14, item 7: many held batches, and the limits they run into -------


def run_bounded(tmp_path, code: str, *args: str, timeout: float = 50):
    """Runs `code` as a script; fails with its output if it fails or hangs."""
    path = _procs.write_script(tmp_path, code)
    try:
        result = subprocess.run(
            [sys.executable, str(path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_procs.script_env(),
            cwd=tmp_path,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the script hung; its output:\n{e.stdout}\n{e.stderr}")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result


HOLD_SCRIPT = """
import os, resource, sys
import numpy as np
from keras_oom import PrefetchLoaderDataset, batch_array

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
N, WIDTH = 1200, 25600  # 100 KiB of float32 per batch

def copied(ids):
    return np.full((len(ids), WIDTH), ids[0], np.float32)

def in_place(ids):
    out = batch_array((len(ids), WIDTH), np.float32)
    out[:] = ids[0]
    return out

def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))

for loader in (copied, in_place):
    with PrefetchLoaderDataset(
        loader, np.arange(N), batch_size=1, num_workers=1, start_method=sys.argv[1]
    ) as ds:
        held = [ds[i] for i in range(N)]
        bad = [i for i, x in enumerate(held) if x.shape != (1, WIDTH) or (x != i).any()]
        print(loader.__name__, "BAD", len(bad), bad[:5])
        print(loader.__name__, "FDS", fds("self"), [fds(p) for p in ds.worker_pids])
        del held
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "subprocess"])
def test_holding_more_batches_than_the_descriptor_limit(tmp_path, start_method):
    """Kind D (issue 14, item 7): 1,200 held batches under a soft limit of 256 files.

    Each mapping used to keep a descriptor (Python's `mmap` dup()s it), so
    batch ~250 failed with `received 0 items of ancdata` and a note blaming
    unpickling. Every batch must arrive, with its values, and neither side
    may keep a descriptor per held batch.
    """
    result = run_bounded(tmp_path, HOLD_SCRIPT, start_method)
    lines = dict(
        (" ".join(line.split()[:2]), line.split(None, 2)[2])
        for line in result.stdout.splitlines()
    )
    for name in ("copied", "in_place"):
        assert lines[f"{name} BAD"] == "0 []", result.stdout
        parent, workers = lines[f"{name} FDS"].split(" ", 1)
        assert int(parent) < 100, result.stdout
        assert all(n < 100 for n in eval(workers)), result.stdout


def test_past_the_mapping_budget_batches_arrive_as_private_copies(channel, monkeypatch):
    """Kind D (issue 14, item 7): the fallback once held buffers pass the budget.

    Beyond `MAPPING_BUDGET` shared mappings in the process (a share of
    `vm.max_map_count`), the parent copies each batch into private memory
    and lets its buffer go at once: held batches stop adding mappings on
    either side, and every value stays right.
    """
    base = len(memfd_mappings())
    monkeypatch.setattr(shm, "MAPPING_BUDGET", base + 16)
    held = []
    for i in range(60):
        kind, got = channel.roundtrip(np.full((256, 1024), float(i), np.float32))
        assert kind == "memfd"
        held.append(got)
    for i, got in enumerate(held):
        assert (got == i).all(), i
    # Writer's and reader's mappings together: about the budget, not 120.
    assert len(memfd_mappings()) <= base + 16 + 4, len(memfd_mappings())
    assert len(channel.writer._maps) <= 12
    assert sum(in_memfd(g) for g in held) < 16


NOFILE_SCRIPT = """
import errno, os, resource
import numpy as np
from keras_oom import PrefetchLoaderDataset

def loader(ids):
    return np.full((len(ids), 65536), ids[0], np.float32)  # 256 KiB

with PrefetchLoaderDataset(loader, np.arange(40), batch_size=1, num_workers=1) as ds:
    held = [ds[0]]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(os.listdir("/proc/self/fd")) + 8
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    fillers = []
    try:
        while True:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    error, failed_at = None, None
    try:
        for i in range(1, 30):
            try:
                held.append(ds[i])  # held: every batch needs a buffer of its own
            except Exception as e:
                error, failed_at = e, i
                break
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print("ERROR", type(error).__name__, getattr(error, "errno", None) == errno.EMFILE)
    print("MESSAGE", str(error).replace(chr(10), " "))
    print("NOTES", " | ".join(getattr(error, "__notes__", [])).replace(chr(10), " "))
    again = {i: ds[i] for i in range(failed_at, failed_at + 5)}
    print("AGAIN", all((x == i).all() for i, x in again.items()))
    print("HELD", all((x == i).all() for i, x in enumerate(held)))
"""


@pytest.mark.timeout(60)
def test_a_descriptor_that_cannot_be_received_says_so(tmp_path):
    """Kind D (issue 14, item 7): the parent has no descriptor left for a batch.

    The error must name the descriptor limit, not `received 0 items of
    ancdata` blamed on unpickling, and the next reads must work once files
    are free again.
    """
    result = run_bounded(tmp_path, NOFILE_SCRIPT)
    out = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert out["ERROR"] == "OSError True", result.stdout
    assert "descriptor" in out["MESSAGE"] and "RLIMIT_NOFILE" in out["MESSAGE"], out
    assert "ancdata" not in out["MESSAGE"], out
    assert "unpickled" not in out["NOTES"] and "received" in out["NOTES"], out
    assert out["AGAIN"] == "True" and out["HELD"] == "True", result.stdout


def test_a_mapping_the_kernel_refuses_is_read_instead(channel, monkeypatch):
    """Kind D (issue 14, item 7): the parent cannot map a new buffer (ENOMEM,
    `vm.max_map_count` reached): its bytes are read with `pread` instead, and
    the worker retires the buffer. It used to fail the batch."""
    real = shm_receive._map_shared

    def refuse_in_the_reader(fd, size):
        if threading.current_thread() is threading.main_thread():  # the reader
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real(fd, size)

    monkeypatch.setattr(shm_receive, "_map_shared", refuse_in_the_reader)
    kind, got = channel.roundtrip(np.full((256, 1024), 4.0, np.float32))
    assert kind == "memfd" and (got == 4.0).all() and not in_memfd(got)
    (buffer_id,) = channel.writer._maps
    monkeypatch.setattr(shm_receive, "_map_shared", real)
    _, later = channel.roundtrip(np.full((256, 1024), 6.0, np.float32))
    assert (later == 6.0).all() and in_memfd(later)
    assert buffer_id not in channel.writer._maps  # retired, not reused
    assert (got == 4.0).all()


def test_a_worker_without_descriptors_sends_through_the_socket(
    worker_channel, monkeypatch
):
    """Kind D (issue 14, item 7): the worker cannot make a shared buffer
    (EMFILE): `batch_array` is plain memory and batches cross in the socket.
    The loader used to fail with the OSError."""

    def no_more_files(*args):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", no_more_files)
    kind, got = worker_channel.load(filled(8.0))
    assert kind == "inline" and (got == 8.0).all() and got.shape == (256, 1024)
    kind, got = worker_channel.roundtrip(np.full((256, 1024), 9.0, np.float32))
    assert kind == "inline" and (got == 9.0).all()
