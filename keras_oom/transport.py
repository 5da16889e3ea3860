"""How a loaded batch travels from a worker process to the parent.

A batch is pickled with protocol 5, which hands NumPy arrays' memory out of
band instead of copying it into the pickle stream. When those buffers are
large, the worker copies them once into an anonymous shared-memory file
(`memfd_create`) and passes the file descriptor over its Unix socket; the
parent maps the file and unpickles, so the arrays it returns are views of
that mapping: no second copy, no pickling of array data.

Why a memfd rather than `multiprocessing.shared_memory`: a memfd has no name.
It is freed by the kernel when the last descriptor and mapping go, so no
block can outlive a crashed worker, a killed parent or a forgotten `close()`,
and there is nothing for a `resource_tracker` to track or warn about. Each
batch gets its own file, so an array the caller holds is never overwritten by
a later batch; its memory goes back to the system when the array is freed.

Small batches, non-array batches and platforms without `memfd_create` take
the plain path: the whole pickle goes through the socket.
"""

from __future__ import annotations

import mmap
import os
import pickle
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

# Below this many bytes of array data, one pickle through the socket is
# cheaper than creating, mapping and passing a file.
SHARED_MEMORY_THRESHOLD = 64 * 1024
_ALIGN = 64  # keeps every array's data aligned for vectorised code

HAS_MEMFD = hasattr(os, "memfd_create")


def send_result(conn: Connection, header: tuple, value: Any) -> None:
    """Sends `value` with a small `header`, through shared memory if large.

    Args:
        conn: The worker's end of its socket to the parent.
        header: A small picklable tuple sent ahead of the value.
        value: The batch, any picklable object.
    """
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    total_oob = sum(r.nbytes for r in raws)
    if not HAS_MEMFD or total_oob < SHARED_MEMORY_THRESHOLD:
        if buffers:  # re-pickle with the buffers in band
            data = pickle.dumps(value, protocol=5)
        conn.send((*header, "inline", data))
        return
    offsets = []
    offset = _aligned(len(data))
    for r in raws:
        offsets.append((offset, r.nbytes))
        offset = _aligned(offset + r.nbytes)
    fd = os.memfd_create("keras_oom_batch", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, offset)
        with mmap.mmap(fd, offset) as mm:
            mm[: len(data)] = data
            for (start, size), r in zip(offsets, raws, strict=True):
                mm[start : start + size] = r
        conn.send((*header, "memfd", (len(data), offsets)))
        send_handle(conn, fd, 0)
    finally:
        os.close(fd)


def receive_value(conn: Connection, kind: str, payload: Any) -> Any:
    """Rebuilds the value announced by a header received from `conn`.

    Args:
        conn: The parent's end of the worker's socket.
        kind: `"inline"` or `"memfd"`, from the header.
        payload: The rest of the header: the pickle, or the layout of the
            shared-memory file whose descriptor follows on `conn`.

    Returns:
        The batch. Its arrays are views of the shared-memory mapping, which
        lives as long as any of them.
    """
    if kind == "inline":
        return pickle.loads(payload)
    data_len, offsets = payload
    fd = recv_handle(conn)
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    view = memoryview(mm)
    return pickle.loads(view[:data_len], buffers=[view[s : s + n] for s, n in offsets])


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
