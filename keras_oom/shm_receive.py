"""The parent's side of the transport: rebuilds batches from a worker's messages.

See transport.py for the way a batch travels; shm.py for the mappings.
"""

from __future__ import annotations

import collections
import errno as errno_module
import mmap
import os
import pickle
import weakref
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from keras_oom import shm
from keras_oom.shm import map_shared as _map_shared
from keras_oom.shm import recv_fd as _recv_fd


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
            or, past `shm.MAPPING_BUDGET` shared mappings in this process,
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
                raise shm.descriptor_error(len(lost))
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
        private = len(shm.MAPPINGS) >= shm.MAPPING_BUDGET

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
            extent = shm.MAPPINGS.get(mm)
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
