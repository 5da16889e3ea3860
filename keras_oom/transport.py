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

Each buffer counts its holds (shm_buffers.py says how, and why a buffer is
never both lent and written by the loader). The worker's side is
`BatchWriter` (here); its buffers and their holds are
`shm_buffers.BufferPool`, its base. The parent's side is
`shm_receive.BatchReader`. Mapping the files, the at-fork hook and passing
descriptors: shm.py.

Small batches, non-array batches and platforms without `memfd_create` take
the plain path: the whole pickle goes through the socket. `batch_array`
then returns a plain `np.empty`, as it does outside a worker.
"""

from __future__ import annotations

import os
import pickle
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Literal, NamedTuple

import numpy as np

from keras_oom.shm import HAS_MEMFD, forget_inherited_mappings
from keras_oom.shm import send_fd as _send_fd
from keras_oom.shm_buffers import MAX_FREE, BufferPool, NoBuffer
from keras_oom.shm_receive import BatchReader

__all__ = [
    "HAS_MEMFD",
    "SHARED_MEMORY_THRESHOLD",
    "BatchReader",
    "BatchWriter",
    "forget_inherited_mappings",
    "shared_empty",
]

# Below this many bytes of array data, one pickle through the socket is
# cheaper than a shared-memory round trip.
SHARED_MEMORY_THRESHOLD = 64 * 1024
_ALIGN = 64  # keeps every array's data aligned for vectorised code
Order = Literal["C", "F"]


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


class _Outgoing(NamedTuple):
    """A batch `prepare`d and not yet transmitted; it holds none of its arrays."""

    message: Callable[[str, Any], Any]
    kind: str  # "inline" or "memfd"
    payload: Any  # the pickle, or (data_ref, parts, new)
    fds: list[int]  # of the new buffers, in the order of `new`
    in_place: list[int]  # buffers sent in place
    keep: int  # free buffers to keep: as many as this batch used


class BatchWriter(BufferPool):
    """The worker's side: sends batches, recycling its shared-memory buffers.

    Its buffers, their holds and the counters `copied_bytes`,
    `in_place_bytes` and `private_bytes` are `BufferPool`'s.
    """

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
            except NoBuffer:
                return None
            self._local.add(buffer_id)
            extent = self._extents[buffer_id]
            extent.used = max(extent.used, nbytes)
        owner = np.frombuffer(self._maps[buffer_id], dtype=np.uint8, count=nbytes)
        # Views of the array keep `owner` alive: the hold ends with the last.
        weakref.finalize(owner, self._dropped.append, buffer_id)
        return np.ndarray(shape, dtype, buffer=owner, order=order)

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
                except NoBuffer:
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
        """Copies what must be copied and takes the holds; raises `NoBuffer`
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
        keep = max(MAX_FREE, len(used))
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


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
