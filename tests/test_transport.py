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
import functools
import gc
import os
import socket
import threading
import time
from multiprocessing.connection import Connection

import _procs
import _sample_loaders
import numpy as np
import pytest

from keras_oom import PrefetchLoaderDataset, WorkerDiedError, batch_array, transport
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
        """Sends `value` as the worker would; returns (kind, received)."""
        self.writer.release(self.reader.take_released())
        errors = []

        def send():
            try:
                message = functools.partial(Loaded, "key", 0.5, 0.0)
                self.writer.send(self.worker_end, message, value)
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
def test_forked_worker_forgets_the_parents_shared_memory(channel):
    """A worker forked later must not pin the memory of batches read earlier.

    Covers a mapping the reader still holds, one only a caller's array holds
    (the reader is gone), and the writer's own buffers.
    """
    _, held = channel.roundtrip(np.full((256, 1024), 3.0, np.float32))
    _, orphan = channel.roundtrip(np.full((256, 1024), 5.0, np.float32))
    channel.reader = BatchReader()  # `orphan` alone keeps its mapping now
    gc.collect()
    assert in_memfd(held) and in_memfd(orphan)
    # Without forgetting, a forked child holds every one of them.
    inherited = in_forked_child(lambda: str(len(memfd_mappings())))
    assert int(inherited) == len(memfd_mappings()) >= 3  # writer's and reader's

    def check():
        transport.forget_inherited_mappings()
        left = memfd_mappings()
        # Touching the forgotten memory reads zeros; it must not crash.
        zeros = not held.any() and not orphan.any() and held.shape == (256, 1024)
        held[0, 0] = 1.0  # and writes stay in the child
        return f"{len(left)} {zeros}"

    assert in_forked_child(check) == "0 True"
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
    out = batch_array((768, 4096), np.float32)  # 12 MiB
    out[:] = np.arange(4096, dtype=np.float32)
    where_made = mapping_of(out)
    want = out.copy()
    kind, got = worker_channel.roundtrip(out)
    assert kind == "memfd"
    assert_same(got, want)
    writer = worker_channel.writer
    assert writer.copied_bytes == 0 and writer.in_place_bytes == out.nbytes
    # The parent's array is the worker's: same shared file, same offset.
    assert mapping_of(got) == where_made
    assert got.__array_interface__["data"][0] != out.__array_interface__["data"][0]
    _, (data, parts, _, _) = worker_channel.payloads[-1]
    assert isinstance(data, bytes)  # the small pickle rides in the message
    assert parts == [(parts[0][0], 0, out.nbytes)]


def test_views_and_mixed_batches_copy_only_what_is_not_in_place(worker_channel):
    out = batch_array((256, 1024), np.float32)
    out[:] = 4.0
    other = np.full((256, 1024), 2.0, np.float32)  # plain memory: copied once
    value = {"x": out[:100], "other": other, "small": np.arange(3)}
    want = {k: v.copy() for k, v in value.items()}
    kind, got = worker_channel.roundtrip(value)
    assert kind == "memfd"
    assert_same(got, want)
    writer = worker_channel.writer
    assert writer.in_place_bytes == out[:100].nbytes
    assert writer.copied_bytes == other.nbytes + value["small"].nbytes
    assert mapping_of(got["x"]) == mapping_of(out)
    assert in_memfd(got["other"]) and mapping_of(got["other"]) != mapping_of(out)


def test_small_batch_arrays_are_plain_memory(worker_channel):
    out = batch_array((4, 4), np.float32)
    assert out.flags.owndata and not in_memfd(out)
    kind, _ = worker_channel.roundtrip(out)
    assert kind == "inline"


def test_batch_array_buffers_are_reused_and_bounded(worker_channel):
    held = []
    for i in range(40):
        out = batch_array((256, 1024), np.float32)
        out[:] = i
        kind, got = worker_channel.roundtrip(out)
        del out  # the loader lets go of its batch, as the worker loop does
        assert kind == "memfd" and got[0, 0] == i
        if i % 10 == 0:
            held.append((i, got))  # a few batches the caller keeps
        del got
        gc.collect()
    for i, got in held:  # never overwritten by later batches
        assert (got == i).all()
    writer = worker_channel.writer
    assert writer.copied_bytes == 0
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


def test_a_batch_array_sent_and_kept_by_both_sides_stays_lent(worker_channel):
    out = batch_array((256, 1024), np.float32)
    out[:] = 3.0
    _, got = worker_channel.roundtrip(out)
    del out  # the worker lets go; the caller still holds `got`
    for i in range(5):
        nxt = batch_array((256, 1024), np.float32)
        nxt[:] = i
        _, later = worker_channel.roundtrip(nxt)
        del nxt, later
        gc.collect()
    assert (got == 3.0).all()


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
