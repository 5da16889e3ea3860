"""A worker's shared-memory buffers and who holds them: the lending bookkeeping.

`BufferPool` is the base of the worker's `BatchWriter` (transport.py): it
owns the buffers (memfd files mapped in the worker, shm.py), counts their
holds, recycles free ones and retires those that must leave the pool. The
writer adds what sends a batch through them.

Buffers are recycled. A fresh shared-memory file costs a page fault and a
zeroed page for every 4 KiB on both sides, about ten times the copy itself;
a reused one costs nothing (in place) or only the copy. So each worker
keeps its files, and the parent maps each file once.

Each buffer counts its holds: one while an array made by `allocate` lives in
the worker (local), one per batch lent to the parent. It is free, and may be
reused or overwritten, only when it has none. So an array the caller holds
keeps its buffer lent, and a later batch never overwrites it: the worker
takes another buffer meanwhile. An array the loader allocated but did not
return (or kept) is no exception: its buffer comes back to the free list
when the worker's last reference to it goes, and not before. The writer
keeps at most `MAX_FREE` free buffers (or as many as the last batch used,
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
"""

from __future__ import annotations

import collections
import mmap
import os
import threading

from keras_oom import shm

ROUND = 1 << 20  # new buffers are sized up to whole MiB to fit later batches
MAX_FREE = 1  # free buffers a worker keeps beyond those lent out


class NoBuffer(Exception):
    """No new shared-memory buffer may be made now (a limit is near)."""


class BufferPool:
    """The worker's buffers, their holds, and the ids the parent must drop.

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
        self._extents: dict[int, shm.Extent] = {}
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

    def _acquire(self, size: int) -> int:
        """A free buffer of at least `size` bytes, else a new one.

        Raises:
            NoBuffer: If a new buffer would pass `MAPPING_BUDGET`, or the
                kernel refuses one (descriptors, mappings, memory).
        """
        fits = [b for b in self._free if len(self._maps[b]) >= size]
        if fits:
            buffer_id = min(fits, key=lambda b: len(self._maps[b]))
            self._free.discard(buffer_id)
            return buffer_id
        if len(shm.MAPPINGS) >= shm.MAPPING_BUDGET:
            raise NoBuffer
        capacity = max(-(-size // ROUND) * ROUND, ROUND)
        try:
            fd = os.memfd_create("keras_oom_batch", os.MFD_CLOEXEC)
        except OSError:
            raise NoBuffer from None
        try:
            os.ftruncate(fd, capacity)
            mm = shm.map_shared(fd, capacity)
        except OSError:
            os.close(fd)
            raise NoBuffer from None
        except BaseException:
            os.close(fd)
            raise
        buffer_id, self._next_id = self._next_id, self._next_id + 1
        self._maps[buffer_id] = mm
        self._extents[buffer_id] = shm.MAPPINGS[mm]
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
        shm.make_private(extent)
        self.private_bytes += min(extent.used or extent.length, extent.length)
        mm = self._maps[buffer_id]
        shm.MAPPINGS.pop(mm, None)  # private memory now: a fork copies it as any
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
            shm.MAPPINGS.pop(mm, None)
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
