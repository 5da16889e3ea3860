"""How a loaded batch travels from a worker process to the parent.

A batch is pickled with protocol 5, which hands NumPy arrays' memory out of
band instead of copying it into the pickle stream. When those buffers are
large, they travel through shared-memory files of the worker's own
(`memfd_create`), and the parent unpickles from its mappings of those files,
so the arrays it returns are views of shared memory: no array data through
the socket.

An array reaches shared memory in one of two ways:

- in place, with no copy at all: the loader built it with `batch_array`
  (samples.py), which in a worker allocates it directly in one of the
  writer's buffers (`BatchWriter.allocate`). At send time the writer
  recognises an out-of-band buffer whose memory lies inside one of its own
  mappings and sends only where it lies: (buffer id, offset, size).
- copied, once: any other array. The writer copies it into a buffer of its
  own, after the pickle stream, as before.

Buffers are recycled. A fresh shared-memory file costs a page fault and a
zeroed page for every 4 KiB on both sides, about ten times the copy itself;
a reused one costs nothing (in place) or only the copy. So each worker keeps
its files, and the parent maps each file once:

    worker (BatchWriter)                       parent (BatchReader)
    loader: batch_array() -> allocate():
      a free buffer, or a new one; the
      array is a view of it (hold: local)
    send(): pickle protocol 5; for each
      out-of-band buffer:
        inside a buffer of ours -> (id, offset, size), no copy
        else -> copied into a copy buffer
               (or, if small, into the message)
      header: pickle (or its place),   --->    maps each buffer it has not seen
      parts, new buffers (their fds            (its fd follows the header)
      follow), discarded buffers               wraps the arrays over its maps;
      (hold: lent, once per batch)             a weakref.finalize per buffer
    the loader's array dies ->                 and batch notes it as released
      its local hold ends                      when its arrays are gone
    releases the lent holds            <---    the ids ride on the next request
    a buffer with no hold is free

Each buffer counts its holds: one while an array made by `allocate` lives in
the worker, one per batch lent to the parent. It is free, and may be
reused or overwritten, only when it has none. So an array the caller holds
keeps its buffer lent, and a later batch never overwrites it: the worker
takes another buffer meanwhile. An array the loader allocated but did not
return (or kept) is no exception: its buffer comes back to the free list
when the worker's last reference to it goes, and not before. The writer
keeps at most `_MAX_FREE` free buffers (or as many as the last batch used,
if more); it closes the others and tells the parent to drop them.

Why a memfd rather than `multiprocessing.shared_memory`: a memfd has no name.
The kernel frees it when the last descriptor and mapping go, so no block can
outlive a crashed worker, a killed parent or a forgotten `close()`, and there
is nothing for a `resource_tracker` to track or warn about.

Small batches, non-array batches and platforms without `memfd_create` take
the plain path: the whole pickle goes through the socket. `batch_array`
then returns a plain `np.empty`, as it does outside a worker.

A forked process inherits every mapping of its parent, so a worker forked for
dataset B would keep dataset A's buffers (and the arrays the user holds)
alive for its whole life. Every mapping made here is therefore registered,
and a freshly forked worker calls `forget_inherited_mappings()` first: it
replaces each one, in place, with private zero pages. `MADV_DONTFORK` in the
parent would do the same for every child, including a user's own `os.fork()`
child that may read the arrays it holds.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import pickle
import threading
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import numpy as np

# Below this many bytes of array data, one pickle through the socket is
# cheaper than a shared-memory round trip.
SHARED_MEMORY_THRESHOLD = 64 * 1024
_ALIGN = 64  # keeps every array's data aligned for vectorised code
_ROUND = 1 << 20  # new buffers are sized up to whole MiB to fit later batches
_MAX_FREE = 1  # free buffers a worker keeps beyond those lent out

HAS_MEMFD = hasattr(os, "memfd_create")

# Every shared-memory mapping made in this process: mmap -> (address, length).
# Weak, so that the registry never keeps a mapping alive.
_MAPPINGS: weakref.WeakKeyDictionary[mmap.mmap, tuple[int, int]] = (
    weakref.WeakKeyDictionary()
)
_MAP_FIXED = 0x10  # not in the mmap module; this value on Linux, BSD, macOS


def _map_shared(fd: int, size: int) -> mmap.mmap:
    """Maps `size` bytes of the shared-memory file `fd`, and registers it."""
    mm = mmap.mmap(fd, size)
    view = ctypes.c_char.from_buffer(mm)
    _MAPPINGS[mm] = (ctypes.addressof(view), len(mm))
    del view  # an exported buffer would stop `mm.close()`
    return mm


def forget_inherited_mappings() -> None:
    """Drops, in a forked child, the shared memory inherited from its parent.

    Each registered mapping still open is replaced in place by private,
    zero-filled pages (`mmap(MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS)`), so
    the child no longer references the parent's shared-memory files, and
    the Python objects over them stay valid: arrays read zeros instead of
    crashing, and closing an `mmap` unmaps the replacement. Call it first
    thing in a forked worker, before any thread starts.

    Raises:
        OSError: If the kernel refuses to replace a mapping.
    """
    if not _MAPPINGS:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    flags = _MAP_FIXED | mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    for mm, (address, length) in list(_MAPPINGS.items()):
        # A closed mmap's range is no longer ours: it may hold anything now.
        if mm.closed:
            continue
        if libc.mmap(address, length, prot, flags, -1, 0) != address:
            errno = ctypes.get_errno()
            raise OSError(
                errno, f"cannot replace a shared mapping: {os.strerror(errno)}"
            )
    _MAPPINGS.clear()


# The writer of the worker process this is, if any: `allocate` serves
# `batch_array` only in the process that activated it (not in a fork of it).
_ACTIVE: tuple[int, BatchWriter] | None = None


def shared_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """An empty array in this worker's shared memory, or None.

    None outside a worker (or in a process forked from one), without
    `memfd_create`, for object dtypes (never sent out of band) and below
    `SHARED_MEMORY_THRESHOLD` bytes (sent through the socket anyway).
    """
    active = _ACTIVE
    if active is None or active[0] != os.getpid() or dtype.hasobject:
        return None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < SHARED_MEMORY_THRESHOLD:
        return None
    return active[1].allocate(shape, dtype)


class BatchWriter:
    """The worker's side: sends batches, recycling its shared-memory buffers.

    Attributes:
        copied_bytes: Array bytes copied so far (into shared memory or the
            message), for tests and benchmarks.
        in_place_bytes: Array bytes sent so far with no copy, from arrays
            made by `allocate`.
    """

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}
        self._spans: dict[int, tuple[int, int]] = {}  # id -> (address, length)
        self._holds: dict[int, int] = {}  # see the module docstring
        self._free: set[int] = set()
        self._unsent_fds: dict[int, int] = {}  # buffers the parent has not mapped
        self._next_id = 0
        # Appended to by finalizers, from whichever thread drops the array.
        self._dropped: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()  # loaders may allocate from threads
        self.copied_bytes = 0
        self.in_place_bytes = 0

    def activate(self) -> None:
        """Makes `batch_array` allocate in this writer's buffers, in this process."""
        global _ACTIVE
        _ACTIVE = (os.getpid(), self)

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array in a buffer of ours, sent in place if returned."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        with self._lock:
            self._collect_dropped()
            buffer_id = self._acquire(nbytes)
            self._holds[buffer_id] = 1  # the local hold
        owner = np.frombuffer(self._maps[buffer_id], dtype=np.uint8, count=nbytes)
        # Views of the array keep `owner` alive: the hold ends with the last.
        weakref.finalize(owner, self._dropped.append, buffer_id)
        return owner.view(dtype).reshape(shape)

    def release(self, buffer_ids: list[int]) -> None:
        """Ends the parent's holds on buffers it no longer uses."""
        with self._lock:
            for b in buffer_ids:
                self._unhold(b)

    def send(
        self, conn: Connection, message: Callable[[str, Any], Any], value: Any
    ) -> None:
        """Sends `value` in a small message, its arrays in shared memory if large.

        Args:
            conn: The worker's end of its socket to the parent.
            message: Makes the message from `(kind, payload)`: `"inline"`
                and the pickle, or `"memfd"` and the layout
                `(pickle, parts, new, discarded)`: the pickle's bytes or
                `(buffer_id, length)`; per out-of-band buffer its bytes or
                `(buffer_id, offset, size)`; `(buffer_id, size)` of the
                buffers whose fds follow; ids the parent should forget.
            value: The batch, any picklable object.
        """
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
        with self._lock:
            self._collect_dropped()
            places = [self._locate(r) for r in raws]
            copied = sum(
                r.nbytes for r, p in zip(raws, places, strict=True) if p is None
            )
            in_place = any(p is not None for p in places)
            if not HAS_MEMFD or (not in_place and copied < SHARED_MEMORY_THRESHOLD):
                if buffers:  # re-pickle with the buffers in band
                    data = pickle.dumps(value, protocol=5)
                self.copied_bytes += copied
                conn.send(message("inline", data))
                return
            layout = self._lay_out(data, raws, places, copied)
            new = layout[2]
            fds = [self._unsent_fds.pop(b) for b, _ in new]
        try:
            conn.send(message("memfd", layout))
            for fd in fds:
                send_handle(conn, fd, 0)
        finally:
            for fd in fds:
                os.close(fd)

    def _lay_out(
        self,
        data: bytes,
        raws: list[memoryview],
        places: list[tuple[int, int] | None],
        copied: int,
    ) -> tuple[Any, list[Any], list[tuple[int, int]], list[int]]:
        """Copies what must be copied; returns the layout `send` announces."""
        parts: list[Any] = []
        used: set[int] = set()
        data_ref: Any = data
        if copied >= SHARED_MEMORY_THRESHOLD:
            # The pickle first, then each copied buffer, aligned.
            end = _aligned(len(data))
            for r, p in zip(raws, places, strict=True):
                if p is None:
                    parts.append((None, end, r.nbytes))
                    end = _aligned(end + r.nbytes)
                else:
                    parts.append((p[0], p[1], r.nbytes))
            copy_id = self._acquire(end)
            self._holds[copy_id] = 0
            mm = self._maps[copy_id]
            mm[: len(data)] = data
            data_ref = (copy_id, len(data))
            for i, (r, p) in enumerate(zip(raws, places, strict=True)):
                if p is None:
                    _, start, size = parts[i]
                    mm[start : start + size] = r
                    parts[i] = (copy_id, start, size)
        else:  # the few copied bytes ride in the message
            for r, p in zip(raws, places, strict=True):
                parts.append(r.tobytes() if p is None else (p[0], p[1], r.nbytes))
        for part in parts:
            if isinstance(part, tuple):
                used.add(part[0])
        for b in used:  # one lent hold per buffer and batch: one release
            self._holds[b] += 1
        self.copied_bytes += copied
        self.in_place_bytes += sum(
            r.nbytes for r, p in zip(raws, places, strict=True) if p
        )
        discarded = self._trim(keep=max(_MAX_FREE, len(used)))
        new = [(b, len(self._maps[b])) for b in sorted(used) if b in self._unsent_fds]
        return data_ref, parts, new, discarded

    def _locate(self, raw: memoryview) -> tuple[int, int] | None:
        """`(buffer_id, offset)` if `raw` lies in a buffer of ours, else None."""
        if raw.nbytes == 0 or not self._spans:
            return None
        address = np.frombuffer(raw, dtype=np.uint8).ctypes.data
        for buffer_id, (start, length) in self._spans.items():
            if start <= address and address + raw.nbytes <= start + length:
                return buffer_id, address - start
        return None

    def _acquire(self, size: int) -> int:
        """A free buffer of at least `size` bytes, else a new one."""
        fits = [b for b in self._free if len(self._maps[b]) >= size]
        if fits:
            buffer_id = min(fits, key=lambda b: len(self._maps[b]))
            self._free.discard(buffer_id)
            return buffer_id
        capacity = max(-(-size // _ROUND) * _ROUND, _ROUND)
        fd = os.memfd_create("keras_oom_batch", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, capacity)
            mm = _map_shared(fd, capacity)
        except BaseException:
            os.close(fd)
            raise
        buffer_id, self._next_id = self._next_id, self._next_id + 1
        self._maps[buffer_id] = mm
        self._spans[buffer_id] = _MAPPINGS[mm]
        self._holds[buffer_id] = 0
        self._unsent_fds[buffer_id] = fd
        return buffer_id

    def _unhold(self, buffer_id: int) -> None:
        holds = self._holds.get(buffer_id, 0)
        if holds <= 0:  # unknown, or already free: nothing to release
            return
        self._holds[buffer_id] = holds - 1
        if holds == 1:
            self._free.add(buffer_id)

    def _collect_dropped(self) -> None:
        while self._dropped:
            self._unhold(self._dropped.popleft())

    def _trim(self, keep: int) -> list[int]:
        """Closes free buffers beyond `keep`, smallest first."""
        dropped = []
        while len(self._free) > keep:
            buffer_id = min(self._free, key=lambda b: len(self._maps[b]))
            try:
                self._maps[buffer_id].close()
            except BufferError:  # its array is being freed in another thread
                break
            self._free.discard(buffer_id)
            del self._holds[buffer_id], self._spans[buffer_id], self._maps[buffer_id]
            fd = self._unsent_fds.pop(buffer_id, None)
            if fd is not None:
                os.close(fd)
            dropped.append(buffer_id)
        return dropped


class BatchReader:
    """The parent's side for one worker: rebuilds batches from its messages."""

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}
        # Appended to by finalizers, from whichever thread drops the arrays.
        self._released: collections.deque[int] = collections.deque()

    def receive(self, conn: Connection, kind: str, payload: Any) -> Any:
        """Rebuilds the value announced by a header received from `conn`.

        Args:
            conn: The parent's end of the worker's socket.
            kind: `"inline"` or `"memfd"`, from the header.
            payload: The rest of the header: the pickle, or the layout of
                the batch in shared memory (see `BatchWriter.send`).

        Returns:
            The batch. Its large arrays are views of the worker's buffers,
            each of which stays lent to them until the last one is freed.
        """
        if kind == "inline":
            return pickle.loads(payload)
        data_ref, parts, new, discarded = payload
        for b in discarded:
            self._maps.pop(b, None)
        for buffer_id, size in new:
            fd = recv_handle(conn)
            try:
                self._maps[buffer_id] = _map_shared(fd, size)
            finally:
                os.close(fd)
        owners: dict[int, np.ndarray] = {}

        def region(buffer_id: int, start: int, size: int) -> np.ndarray:
            owner = owners.get(buffer_id)
            if owner is None:
                owner = np.frombuffer(self._maps[buffer_id], dtype=np.uint8)
                weakref.finalize(owner, self._released.append, buffer_id)
                owners[buffer_id] = owner
            return owner[start : start + size]

        if isinstance(data_ref, bytes):
            data: Any = data_ref
        else:
            data = region(data_ref[0], 0, data_ref[1]).data
        arrays = [bytearray(p) if isinstance(p, bytes) else region(*p) for p in parts]
        return pickle.loads(data, buffers=arrays)

    def take_released(self) -> list[int]:
        """The buffers released since the last call, to return to the worker."""
        released = []
        while self._released:
            released.append(self._released.popleft())
        return released


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
