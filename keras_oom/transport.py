"""How a loaded batch travels from a worker process to the parent.

A batch is pickled with protocol 5, which hands NumPy arrays' memory out of
band instead of copying it into the pickle stream. When those buffers are
large, the worker copies them once into a shared-memory file of its own
(`memfd_create`) and the parent unpickles from its mapping of that file, so
the arrays it returns are views of shared memory: one copy in all, and no
array data through the socket.

Buffers are recycled. A fresh shared-memory file costs a page fault and a
zeroed page for every 4 KiB on both sides, about ten times the copy itself;
a reused one costs only the copy. So each worker keeps its files, and the
parent maps each file once:

    worker (BatchWriter)                      parent (BatchReader)
    picks a free buffer, or makes one  --->   maps a new buffer once (its fd
    copies the arrays in                      comes with the header)
    header: buffer id, layout                 wraps the arrays over its map;
                                              a weakref.finalize on them
                                              notes the buffer as released
    marks released buffers free        <---   the ids ride on the next request

An array the caller holds keeps its buffer lent, so a later batch never
overwrites it: the worker takes another buffer meanwhile.

Why a memfd rather than `multiprocessing.shared_memory`: a memfd has no name.
The kernel frees it when the last descriptor and mapping go, so no block can
outlive a crashed worker, a killed parent or a forgotten `close()`, and there
is nothing for a `resource_tracker` to track or warn about.

Small batches, non-array batches and platforms without `memfd_create` take
the plain path: the whole pickle goes through the socket.

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


class BatchWriter:
    """The worker's side: sends batches, recycling its shared-memory buffers."""

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}
        self._free: set[int] = set()
        self._next_id = 0

    def release(self, buffer_ids: list[int]) -> None:
        """Marks buffers the parent no longer uses as free for reuse."""
        self._free.update(b for b in buffer_ids if b in self._maps)

    def send(
        self, conn: Connection, message: Callable[[str, Any], Any], value: Any
    ) -> None:
        """Sends `value` in a small message, its arrays in shared memory if large.

        Args:
            conn: The worker's end of its socket to the parent.
            message: Makes the message from `(kind, payload)`: `"inline"`
                and the pickle, or `"memfd"` and the buffer's layout.
            value: The batch, any picklable object.
        """
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
        if not HAS_MEMFD or sum(r.nbytes for r in raws) < SHARED_MEMORY_THRESHOLD:
            if buffers:  # re-pickle with the buffers in band
                data = pickle.dumps(value, protocol=5)
            conn.send(message("inline", data))
            return
        offsets = []
        end = _aligned(len(data))
        for r in raws:
            offsets.append((end, r.nbytes))
            end = _aligned(end + r.nbytes)
        buffer_id, new_fd = self._acquire(end)
        mm = self._maps[buffer_id]
        mm[: len(data)] = data
        for (start, size), r in zip(offsets, raws, strict=True):
            mm[start : start + size] = r
        discarded = self._trim()
        new_size = len(mm) if new_fd is not None else None
        layout = (buffer_id, new_size, len(data), offsets, discarded)
        conn.send(message("memfd", layout))
        if new_fd is not None:
            try:
                send_handle(conn, new_fd, 0)
            finally:
                os.close(new_fd)

    def _acquire(self, size: int) -> tuple[int, int | None]:
        """A free buffer of at least `size` bytes, else a new one with its fd."""
        fits = [b for b in self._free if len(self._maps[b]) >= size]
        if fits:
            buffer_id = min(fits, key=lambda b: len(self._maps[b]))
            self._free.discard(buffer_id)
            return buffer_id, None
        capacity = -(-size // _ROUND) * _ROUND
        fd = os.memfd_create("keras_oom_batch", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, capacity)
            mm = _map_shared(fd, capacity)
        except BaseException:
            os.close(fd)
            raise
        buffer_id, self._next_id = self._next_id, self._next_id + 1
        self._maps[buffer_id] = mm
        return buffer_id, fd

    def _trim(self) -> list[int]:
        """Drops free buffers beyond `_MAX_FREE`, smallest first."""
        dropped = []
        while len(self._free) > _MAX_FREE:
            buffer_id = min(self._free, key=lambda b: len(self._maps[b]))
            self._free.discard(buffer_id)
            self._maps.pop(buffer_id).close()
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
            payload: The rest of the header: the pickle, or the layout of the
                shared-memory buffer that holds it.

        Returns:
            The batch. Its arrays are views of the worker's buffer, which
            stays lent to them until the last one is freed.
        """
        if kind == "inline":
            return pickle.loads(payload)
        buffer_id, new_size, data_len, offsets, discarded = payload
        for b in discarded:
            self._maps.pop(b, None)
        if new_size is not None:
            fd = recv_handle(conn)
            try:
                self._maps[buffer_id] = _map_shared(fd, new_size)
            finally:
                os.close(fd)
        owner = np.frombuffer(self._maps[buffer_id], dtype=np.uint8)
        weakref.finalize(owner, self._released.append, buffer_id)
        return pickle.loads(
            owner[:data_len].data,
            buffers=[owner[s : s + n] for s, n in offsets],
        )

    def take_released(self) -> list[int]:
        """The buffers released since the last call, to return to the worker."""
        released = []
        while self._released:
            released.append(self._released.popleft())
        return released


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
