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
  own, after the pickle stream.

Buffers are recycled. A fresh shared-memory file costs a page fault and a
zeroed page for every 4 KiB on both sides, about ten times the copy itself;
a reused one costs nothing (in place) or only the copy. So each worker keeps
its files, and the parent maps each file once:

    worker (BatchWriter)                       parent (BatchReader)
    loader: batch_array() -> allocate():
      a free buffer, or a new one; the
      array is a view of it (hold: local)
    prepare(): pickle protocol 5; for
      each out-of-band buffer:
        inside a buffer of ours -> (id, offset, size), no copy
        else -> copied into a copy buffer
               (or, if small, into the message)
      (hold: lent, once per batch)
    the worker loop drops the batch
    transmit(): a buffer sent in place
      whose local hold is still alive
      becomes private (see below);
      header: pickle (or its place),   --->    maps each buffer it has not seen
      parts, new buffers (their fds            (its fd follows the header),
      follow), buffers to forget               wraps the arrays over its maps;
                                               a weakref.finalize per buffer
                                               and batch notes it as released
                                               when its arrays are gone
    releases the lent holds            <---    the ids ride on the next request
    a buffer with no hold is free

Each buffer counts its holds: one while an array made by `allocate` lives in
the worker (local), one per batch lent to the parent. It is free, and may be
reused or overwritten, only when it has none. So an array the caller holds
keeps its buffer lent, and a later batch never overwrites it: the worker
takes another buffer meanwhile. An array the loader allocated but did not
return (or kept) is no exception: its buffer comes back to the free list
when the worker's last reference to it goes, and not before. The writer
keeps at most `_MAX_FREE` free buffers (or as many as the last batch used,
if more); it closes the others and tells the parent to drop them.

A buffer both lent and held locally would be shared memory that two
processes may write: a loader that keeps its `batch_array` (allocated once
in a module-level variable, a view of it, a ring of slots in it) and refills
it for the next batch would change the batches the caller holds, and a
caller that writes into a batch (`x /= 255`) would change the loader's
array. So the worker loop drops its batch between `prepare` and `transmit`,
and `transmit` checks each buffer sent in place: if an array of the loader
still lives on it, the worker's own view of that range is replaced, at the
same address, by private memory holding the same bytes (`mremap` of a
private copy over it), and the buffer leaves the writer's pool: its file
lives on only in the parent's mapping, until the parent drops the batch.
Later sends of the kept array are ordinary copies. This happens before the
header leaves, so no write of either side reaches the other. The common
case, a fresh `batch_array` per batch, keeps no local hold past the send and
is never copied. Out of scope: a loader that returns a `batch_array` and
goes on writing into it from a background thread afterwards (the write
may land before or after the copy).

Why a memfd rather than `multiprocessing.shared_memory`: a memfd has no name.
The kernel frees it when the last descriptor and mapping go, so no block can
outlive a crashed worker, a killed parent or a forgotten `close()`, and there
is nothing for a `resource_tracker` to track or warn about.

Descriptors and mappings. A mapping needs no descriptor once made, but
Python's `mmap.mmap(fd, ...)` keeps a dup() of it for the mapping's life:
with batches held in a list, one descriptor per batch on each side, and
the soft `RLIMIT_NOFILE` (often 1,024) ran out. So each file is mapped over
an anonymous placeholder mapping (`mmap(MAP_FIXED)` on its range), and its
descriptor is closed at once: held batches cost no descriptor, on either
side; a descriptor exists only while a new buffer crosses (sent and
received without the dup() `multiprocessing.reduction` makes). Mappings
remain, one per held buffer on each side, and a process may have only
`vm.max_map_count` of them (65,530 by default) for everything it maps.
Past `MAPPING_BUDGET` shared mappings in a process (a quarter of that
limit), the parent copies each batch it receives into private memory and
lets its buffers go at once, and the writer makes no new buffer (a batch
then crosses through a free buffer or in the socket): slower, nothing lost.
If a descriptor still cannot be received (the process has exhausted its
descriptors elsewhere), the read raises an `OSError` (`EMFILE`) that says
so; the worker retires the buffer, and later reads work.

Small batches, non-array batches and platforms without `memfd_create` take
the plain path: the whole pickle goes through the socket. `batch_array`
then returns a plain `np.empty`, as it does outside a worker.

A forked process inherits every mapping of its parent: a shared mapping
would keep the worker's file alive in the child for the child's whole life,
and would show the child whatever the worker writes there later, once the
parent lets the buffer go. So an at-fork hook (`os.register_at_fork`) runs
in every child of `os.fork()`, a worker or the user's own: each registered
mapping that no array references any more is unmapped, and each that
arrays still reference is replaced, in place, by a private copy of its
bytes. A forked process sees the values its parent had at the fork, and
maps none of the workers' files. The trade-off is memory, and time at the
fork: a child costs a private copy of the shared batches its parent holds
at the fork (only those; nothing for a parent that holds none; about 10 ms
per 12 MiB batch held, measured). `start_method="subprocess"` workers
inherit nothing, so they copy nothing. (The zero pages given to forked
workers before lost the values of any array their loader captured.)
"""

from __future__ import annotations

import array
import collections
import ctypes
import errno as errno_module
import mmap
import os
import pickle
import socket
import threading
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Literal, NamedTuple

import numpy as np

# Below this many bytes of array data, one pickle through the socket is
# cheaper than a shared-memory round trip.
SHARED_MEMORY_THRESHOLD = 64 * 1024
_ALIGN = 64  # keeps every array's data aligned for vectorised code
_ROUND = 1 << 20  # new buffers are sized up to whole MiB to fit later batches
_MAX_FREE = 1  # free buffers a worker keeps beyond those lent out

HAS_MEMFD = hasattr(os, "memfd_create")
Order = Literal["C", "F"]

# Not in the mmap module; these values on Linux (MAP_FIXED also on BSD, macOS).
_MAP_FIXED = 0x10
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2


def _mapping_budget() -> int:
    """How many shared mappings a process may hold before batches are copied."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        limit = 65530  # Linux's default
    return max(64, limit // 4)


# Shared mappings (both sides' together) a process holds before the parent
# copies batches into private memory and the writer makes no new buffer.
MAPPING_BUDGET = _mapping_budget()


class _Extent:
    """Where a shared mapping lies, and how much of it has held data."""

    __slots__ = ("address", "length", "used")

    def __init__(self, address: int, length: int) -> None:
        self.address = address
        self.length = length
        self.used = 0  # high-water mark from offset 0: what a fork must copy


# Every shared-memory mapping made in this process. Weak, so that the
# registry never keeps a mapping alive.
_MAPPINGS: weakref.WeakKeyDictionary[mmap.mmap, _Extent] = weakref.WeakKeyDictionary()


class _Libc:
    """libc's mmap and mremap, resolved once at import: a forked child must
    not load libraries (a lock held by another thread of the parent at the
    fork would never be released)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.mmap = libc.mmap
        self.mmap.restype = ctypes.c_void_p
        self.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        self.munmap = libc.munmap
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.mremap = getattr(libc, "mremap", None)
        if self.mremap is not None:
            self.mremap.restype = ctypes.c_void_p
            self.mremap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_void_p,
            ]


_LIBC = _Libc() if HAS_MEMFD else None
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE if HAS_MEMFD else 0


def _os_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def _map_shared(fd: int, size: int) -> mmap.mmap:
    """Maps `size` bytes of the shared-memory file `fd`, and registers it.

    The `mmap` object is made anonymous, so it keeps no descriptor, and the
    file is then mapped over its range. Closing or freeing the object
    unmaps the file, as for any `mmap`.

    Raises:
        OSError: If the kernel refuses the mapping (`ENOMEM`: no memory, or
            `vm.max_map_count` mappings already).
    """
    assert _LIBC is not None
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)  # a placeholder range
    view = ctypes.c_char.from_buffer(mm)
    address = ctypes.addressof(view)
    del view  # an exported buffer would stop `mm.close()`
    flags = mmap.MAP_SHARED | _MAP_FIXED
    if _LIBC.mmap(address, size, _PROT_RW, flags, fd, 0) != address:
        error = _os_error("cannot map a shared-memory buffer")
        mm.close()
        raise error
    _MAPPINGS[mm] = _Extent(address, size)
    return mm


def _make_private(extent: _Extent) -> None:
    """Replaces a shared mapping, in place, by private memory with its bytes.

    Copies the first `extent.used` bytes (all, if unknown); the rest reads
    as zeros. Where `mremap` exists, the private copy moves over the range
    in one step, so a thread reading the array meanwhile never sees zeros.

    Raises:
        OSError: If the kernel refuses the private memory.
    """
    assert _LIBC is not None
    address, length = extent.address, extent.length
    used = min(extent.used or length, length)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if _LIBC.mremap is not None:
        copy = _LIBC.mmap(None, length, _PROT_RW, flags, -1, 0)
        if copy is None or copy == ctypes.c_void_p(-1).value:
            raise _os_error("cannot copy a shared mapping")
        ctypes.memmove(copy, address, used)
        moved = _LIBC.mremap(
            copy, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, address
        )
        if moved != address:
            error = _os_error("cannot replace a shared mapping")
            _LIBC.munmap(copy, length)
            raise error
        return
    saved = ctypes.string_at(address, used)
    if _LIBC.mmap(address, length, _PROT_RW, flags | _MAP_FIXED, -1, 0) != address:
        raise _os_error("cannot replace a shared mapping")
    ctypes.memmove(address, saved, used)


def forget_inherited_mappings() -> None:
    """Lets go, in a forked child, of the shared memory inherited from its parent.

    Each registered mapping that no array references is unmapped (its
    `mmap` is closed); each that arrays still reference is replaced in place
    by a private copy of its bytes, so those arrays keep the values of the
    moment of the fork, and the child maps none of the workers' files. Runs
    by itself in every child of `os.fork()` (an at-fork hook); calling it
    again does nothing. A mapping the kernel refuses to copy stays shared.
    """
    for mm, extent in list(_MAPPINGS.items()):
        if mm.closed:
            continue
        try:
            mm.close()  # refused while arrays (exported buffers) use it
        except BufferError:
            try:
                _make_private(extent)
            except OSError:
                continue
    _MAPPINGS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=forget_inherited_mappings)


# The writer of the worker process this is, if any: `allocate` serves
# `batch_array` only in the process that activated it (not in a fork of it).
_ACTIVE: tuple[int, BatchWriter] | None = None


def shared_empty(
    shape: tuple[int, ...], dtype: np.dtype, order: Order = "C"
) -> np.ndarray | None:
    """An empty array in this worker's shared memory, or None.

    `shape`, `dtype` and `order` are those of an array `np.empty` made (a
    subarray dtype already expanded into `shape`). None outside a worker (or
    in a process forked from one), without `memfd_create`, for object dtypes
    (never sent out of band), below `SHARED_MEMORY_THRESHOLD` bytes (sent
    through the socket anyway), and when no buffer can be had (descriptor
    or mapping limits).
    """
    active = _ACTIVE
    if active is None or active[0] != os.getpid() or dtype.hasobject:
        return None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < SHARED_MEMORY_THRESHOLD:
        return None
    return active[1].allocate(shape, dtype, order)


class _NoBuffer(Exception):
    """No new shared-memory buffer may be made now (a limit is near)."""


class _Outgoing(NamedTuple):
    """A batch `prepare`d and not yet transmitted; it holds none of its arrays."""

    message: Callable[[str, Any], Any]
    kind: str  # "inline" or "memfd"
    payload: Any  # the pickle, or (data_ref, parts, new)
    fds: list[int]  # of the new buffers, in the order of `new`
    in_place: list[int]  # buffers sent in place
    keep: int  # free buffers to keep: as many as this batch used


class BatchWriter:
    """The worker's side: sends batches, recycling its shared-memory buffers.

    Attributes:
        copied_bytes: Array bytes copied so far (into shared memory or the
            message), for tests and benchmarks.
        in_place_bytes: Array bytes sent so far with no copy, from arrays
            made by `allocate`.
        private_bytes: Bytes copied so far to make buffers private that the
            loader kept after sending them in place.
    """

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}
        self._extents: dict[int, _Extent] = {}
        self._local: set[int] = set()  # an array made by `allocate` lives
        self._lent: dict[int, int] = {}  # batches lent to the parent
        self._free: set[int] = set()
        self._unsent_fds: dict[int, int] = {}  # buffers the parent has not mapped
        self._retired: list[int] = []  # left the pool; the parent must drop them
        self._next_id = 0
        # Appended to by finalizers, from whichever thread drops the array.
        self._dropped: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()  # loaders may allocate from threads
        self.copied_bytes = 0
        self.in_place_bytes = 0
        self.private_bytes = 0

    def activate(self) -> None:
        """Makes `batch_array` allocate in this writer's buffers, in this process."""
        global _ACTIVE
        _ACTIVE = (os.getpid(), self)

    def allocate(
        self, shape: tuple[int, ...], dtype: np.dtype, order: Order = "C"
    ) -> np.ndarray | None:
        """An uninitialised array in a buffer of ours, sent in place if returned.

        None if no buffer can be had: no free one fits, and a new one would
        pass `MAPPING_BUDGET` or the kernel refuses it.
        """
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        with self._lock:
            self._collect_dropped()
            try:
                buffer_id = self._acquire(nbytes)
            except _NoBuffer:
                return None
            self._local.add(buffer_id)
            extent = self._extents[buffer_id]
            extent.used = max(extent.used, nbytes)
        owner = np.frombuffer(self._maps[buffer_id], dtype=np.uint8, count=nbytes)
        # Views of the array keep `owner` alive: the hold ends with the last.
        weakref.finalize(owner, self._dropped.append, buffer_id)
        return np.ndarray(shape, dtype, buffer=owner, order=order)

    def release(self, buffer_ids: list[int]) -> None:
        """Ends the parent's holds on buffers it no longer uses.

        Args:
            buffer_ids: Ids from `BatchReader.take_released`: `b` ends one
                lent hold on buffer `b`; `~b` (negative) says the parent
                never mapped buffer `b` (its descriptor did not arrive, or
                could not be mapped): it leaves the pool.
        """
        with self._lock:
            for b in buffer_ids:
                if b >= 0:
                    self._unlend(b)
                else:
                    self._retire(~b)

    def send(
        self, conn: Connection, message: Callable[[str, Any], Any], value: Any
    ) -> None:
        """Sends `value` in a small message, its arrays in shared memory if large.

        The same as `transmit(conn, prepare(message, value))`. The caller
        still holds `value` meanwhile, so a buffer sent in place becomes
        private to this process (one copy); the worker loop uses the two
        steps and drops its batch in between.
        """
        self.transmit(conn, self.prepare(message, value))

    def prepare(self, message: Callable[[str, Any], Any], value: Any) -> _Outgoing:
        """Lays a batch out for `transmit`: pickles it, copies what must be copied.

        Args:
            message: Makes the message from `(kind, payload)`: `"inline"`
                and the pickle, or `"memfd"` and the layout
                `(pickle, parts, new, discarded)`: the pickle's bytes or
                `(buffer_id, length)`; per out-of-band buffer its bytes or
                `(buffer_id, offset, size)`; `(buffer_id, size)` of the
                buffers whose fds follow; ids the parent should forget once
                it has built this batch.
            value: The batch, any picklable object.

        Returns:
            What `transmit` sends. It references none of `value`'s arrays.

        Raises:
            Exception: Whatever pickling `value` raises.
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
            if HAS_MEMFD and (in_place or copied >= SHARED_MEMORY_THRESHOLD):
                try:
                    return self._lay_out(message, data, raws, places, copied)
                except _NoBuffer:
                    pass  # near a limit: the whole batch goes in the socket
        if buffers:  # re-pickle with the buffers in band
            data = pickle.dumps(value, protocol=5)
        with self._lock:
            self.copied_bytes += sum(r.nbytes for r in raws)
        return _Outgoing(message, "inline", data, [], [], 0)

    def transmit(self, conn: Connection, outgoing: _Outgoing) -> None:
        """Sends a prepared batch; buffers it shares with the loader first go private.

        Call it once the batch's other references are dropped: a buffer sent
        in place that an array of the loader still uses is copied into
        private memory on this side, and leaves the pool (module docstring).

        Raises:
            OSError: If the socket fails.
        """
        if outgoing.kind == "inline":
            conn.send(outgoing.message("inline", outgoing.payload))
            return
        fds = outgoing.fds
        try:
            with self._lock:
                self._collect_dropped()
                for b in outgoing.in_place:
                    if b in self._local:  # the loader kept the array, or a view
                        self._make_private(b)
                discarded = self._trim(keep=outgoing.keep) + self._retired
                self._retired = []
            data_ref, parts, new = outgoing.payload
            conn.send(outgoing.message("memfd", (data_ref, parts, new, discarded)))
            for fd in fds:
                _send_fd(conn, fd)
        finally:
            for fd in fds:
                os.close(fd)

    def _lay_out(
        self,
        message: Callable[[str, Any], Any],
        data: bytes,
        raws: list[memoryview],
        places: list[tuple[int, int] | None],
        copied: int,
    ) -> _Outgoing:
        """Copies what must be copied and takes the holds; raises `_NoBuffer`
        (having changed nothing) if a copy buffer cannot be had."""
        parts: list[Any] = []
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
            mm = self._maps[copy_id]
            extent = self._extents[copy_id]
            extent.used = max(extent.used, end)
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
        used = {part[0] for part in parts if isinstance(part, tuple)}
        if isinstance(data_ref, tuple):
            used.add(data_ref[0])
        for b in used:  # one lent hold per buffer and batch: one release
            self._lent[b] += 1
            self._free.discard(b)
        self.copied_bytes += copied
        self.in_place_bytes += sum(
            r.nbytes for r, p in zip(raws, places, strict=True) if p
        )
        new = [(b, len(self._maps[b])) for b in sorted(used) if b in self._unsent_fds]
        fds = [self._unsent_fds.pop(b) for b, _ in new]
        in_place = sorted({p[0] for p in places if p is not None})
        keep = max(_MAX_FREE, len(used))
        return _Outgoing(message, "memfd", (data_ref, parts, new), fds, in_place, keep)

    def _locate(self, raw: memoryview) -> tuple[int, int] | None:
        """`(buffer_id, offset)` if `raw` lies in a buffer of ours, else None."""
        if raw.nbytes == 0 or not self._extents:
            return None
        address = np.frombuffer(raw, dtype=np.uint8).ctypes.data
        for buffer_id, extent in self._extents.items():
            start, length = extent.address, extent.length
            if start <= address and address + raw.nbytes <= start + length:
                return buffer_id, address - start
        return None

    def _acquire(self, size: int) -> int:
        """A free buffer of at least `size` bytes, else a new one.

        Raises:
            _NoBuffer: If a new buffer would pass `MAPPING_BUDGET`, or the
                kernel refuses one (descriptors, mappings, memory).
        """
        fits = [b for b in self._free if len(self._maps[b]) >= size]
        if fits:
            buffer_id = min(fits, key=lambda b: len(self._maps[b]))
            self._free.discard(buffer_id)
            return buffer_id
        if len(_MAPPINGS) >= MAPPING_BUDGET:
            raise _NoBuffer
        capacity = max(-(-size // _ROUND) * _ROUND, _ROUND)
        try:
            fd = os.memfd_create("keras_oom_batch", os.MFD_CLOEXEC)
        except OSError:
            raise _NoBuffer from None
        try:
            os.ftruncate(fd, capacity)
            mm = _map_shared(fd, capacity)
        except OSError:
            os.close(fd)
            raise _NoBuffer from None
        except BaseException:
            os.close(fd)
            raise
        buffer_id, self._next_id = self._next_id, self._next_id + 1
        self._maps[buffer_id] = mm
        self._extents[buffer_id] = _MAPPINGS[mm]
        self._lent[buffer_id] = 0
        self._unsent_fds[buffer_id] = fd
        return buffer_id

    def _unlend(self, buffer_id: int) -> None:
        lent = self._lent.get(buffer_id, 0)
        if lent <= 0:  # unknown (retired), or not lent: nothing to release
            return
        self._lent[buffer_id] = lent - 1
        self._maybe_free(buffer_id)

    def _maybe_free(self, buffer_id: int) -> None:
        if self._lent.get(buffer_id) == 0 and buffer_id not in self._local:
            self._free.add(buffer_id)

    def _collect_dropped(self) -> None:
        while self._dropped:
            buffer_id = self._dropped.popleft()
            if buffer_id in self._local:
                self._local.discard(buffer_id)
                self._maybe_free(buffer_id)

    def _make_private(self, buffer_id: int) -> None:
        """Gives the loader's arrays on a lent buffer private memory; retires it."""
        extent = self._extents[buffer_id]
        _make_private(extent)
        self.private_bytes += min(extent.used or extent.length, extent.length)
        mm = self._maps[buffer_id]
        _MAPPINGS.pop(mm, None)  # private memory now: a fork copies it as any
        self._forget(buffer_id)
        self._retired.append(buffer_id)

    def _retire(self, buffer_id: int) -> None:
        """Takes a buffer the parent never mapped out of the pool."""
        if buffer_id not in self._maps:
            return
        if buffer_id in self._local:
            self._make_private(buffer_id)  # the loader's arrays live on
            return
        mm = self._maps[buffer_id]
        try:
            mm.close()
        except BufferError:  # an array on it is being freed in another thread
            _MAPPINGS.pop(mm, None)
        self._forget(buffer_id)

    def _forget(self, buffer_id: int) -> None:
        del self._maps[buffer_id], self._extents[buffer_id], self._lent[buffer_id]
        self._local.discard(buffer_id)
        self._free.discard(buffer_id)
        fd = self._unsent_fds.pop(buffer_id, None)
        if fd is not None:
            os.close(fd)

    def _trim(self, keep: int) -> list[int]:
        """Closes free buffers beyond `keep`, smallest first."""
        dropped = []
        while len(self._free) > keep:
            buffer_id = min(self._free, key=lambda b: len(self._maps[b]))
            try:
                self._maps[buffer_id].close()
            except BufferError:  # its array is being freed in another thread
                break
            self._forget(buffer_id)
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
                the batch in shared memory (see `BatchWriter.prepare`).

        Returns:
            The batch. Its large arrays are views of the worker's buffers,
            each of which stays lent to them until the last one is freed;
            or, past `MAPPING_BUDGET` shared mappings in this process,
            private copies (the buffers go back to the worker at once).

        Raises:
            OSError: `EMFILE` if a buffer's descriptor could not be received
                (this process is at its limit of open files). The socket
                stays in step: the next batch can be received.
            Exception: Whatever unpickling the batch raises.
        """
        if kind == "inline":
            return pickle.loads(payload)
        data_ref, parts, new, discarded = payload
        unmapped: dict[int, int] = {}  # buffer id -> fd, read with pread
        lost: list[int] = []
        try:
            for buffer_id, size in new:
                fd = _recv_fd(conn)
                if fd is None:
                    lost.append(buffer_id)
                    continue
                try:
                    self._maps[buffer_id] = _map_shared(fd, size)
                except OSError:  # no mapping left: read its bytes instead
                    unmapped[buffer_id] = fd
                    continue
                os.close(fd)
            used = {p[0] for p in parts if isinstance(p, tuple)}
            if not isinstance(data_ref, bytes):
                used.add(data_ref[0])
            if lost:
                for b in used:  # the batch is not rebuilt: give all back
                    self._released.append(~b if b in lost or b in unmapped else b)
                raise _descriptor_error(len(lost))
            value = self._rebuild(data_ref, parts, unmapped)
            for b in unmapped:  # the worker retires what was never mapped
                self._released.append(~b)
            return value
        finally:
            for fd in unmapped.values():
                os.close(fd)
            for b in discarded:
                self._maps.pop(b, None)

    def _rebuild(
        self, data_ref: Any, parts: list[Any], unmapped: dict[int, int]
    ) -> Any:
        owners: dict[int, np.ndarray] = {}
        private = len(_MAPPINGS) >= MAPPING_BUDGET

        def region(buffer_id: int, start: int, size: int) -> np.ndarray:
            if buffer_id in unmapped:
                out = np.empty(size, np.uint8)
                if os.preadv(unmapped[buffer_id], [out.data], start) != size:
                    raise OSError(errno_module.EIO, "short read of a shared buffer")
                return out
            mm = self._maps[buffer_id]
            owner = owners.get(buffer_id)
            if owner is None:
                owner = np.frombuffer(mm, dtype=np.uint8)
                weakref.finalize(owner, self._released.append, buffer_id)
                owners[buffer_id] = owner
            extent = _MAPPINGS.get(mm)
            if extent is not None:  # what a fork must copy
                extent.used = max(extent.used, start + size)
            view = owner[start : start + size]
            return view.copy() if private else view

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


def _send_fd(conn: Connection, fd: int) -> None:
    """Sends descriptor `fd` over `conn` (one byte and `SCM_RIGHTS`).

    Unlike `multiprocessing.reduction.send_handle`, it dup()s nothing, so
    it needs no free descriptor of its own.
    """
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.settimeout(None)  # blocking, whatever socket.setdefaulttimeout says
        fds = array.array("i", [fd])
        sock.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    finally:
        sock.detach()  # the descriptor is still `conn`'s


def _recv_fd(conn: Connection) -> int | None:
    """Receives one descriptor sent by `_send_fd`; None if it did not fit.

    The byte that carries it is read either way, so the stream stays in
    step. Needs one free descriptor (the received one), no dup().

    Raises:
        EOFError: If the worker closed the socket.
    """
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.settimeout(None)  # blocking, whatever socket.setdefaulttimeout says
        size = socket.CMSG_SPACE(array.array("i").itemsize)
        msg, ancdata, flags, _ = sock.recvmsg(1, size, socket.MSG_CMSG_CLOEXEC)
    finally:
        sock.detach()
    if not msg:
        raise EOFError("the worker closed its socket")
    fds = array.array("i")
    for level, type_, data in ancdata:
        if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    for extra in fds[1:]:  # never more than one is sent
        os.close(extra)
    if fds and not flags & socket.MSG_CTRUNC:
        return fds[0]
    if fds:
        os.close(fds[0])
    return None


def _descriptor_error(count: int) -> OSError:
    """Says plainly that a batch's descriptor did not fit in this process."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = f"soft RLIMIT_NOFILE={soft}, hard {hard}"
    except (ImportError, OSError, ValueError):
        limit = "RLIMIT_NOFILE"
    try:
        opened = f"; {len(os.listdir('/proc/self/fd'))} open"
    except OSError:
        opened = ""
    return OSError(
        errno_module.EMFILE,
        f"keras_oom: a batch from a worker could not be received: "
        f"{count} shared-memory file descriptor(s) did not fit in this process, "
        f"which is at its limit of open files ({limit}{opened}). Batches you "
        f"hold use no descriptor: close files you no longer need, or raise "
        f"the soft limit (`ulimit -n`, or resource.setrlimit). Nothing else "
        f"was lost: read the batch again to load it again.",
    )


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
