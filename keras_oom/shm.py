"""Shared-memory files and their mappings, in one process; descriptors across.

The low layer of the transport (transport.py): makes and maps the
`memfd` files batches travel in, keeps a registry of every shared mapping
this process holds, turns a mapping private in place, lets a forked child
go of its parent's mappings, and passes a file's descriptor over a socket.

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
import ctypes
import errno as errno_module
import mmap
import os
import socket
import weakref
from multiprocessing.connection import Connection
from typing import Any

HAS_MEMFD = hasattr(os, "memfd_create")

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


class Extent:
    """Where a shared mapping lies, and how much of it has held data."""

    __slots__ = ("address", "length", "used")

    def __init__(self, address: int, length: int) -> None:
        self.address = address
        self.length = length
        self.used = 0  # high-water mark from offset 0: what a fork must copy


# Every shared-memory mapping made in this process. Weak, so that the
# registry never keeps a mapping alive.
MAPPINGS: weakref.WeakKeyDictionary[mmap.mmap, Extent] = weakref.WeakKeyDictionary()


class _Libc:
    """libc's mmap and mremap, resolved once at import: a forked child must
    not load libraries (a lock held by another thread of the parent at the
    fork would never be released)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        ptr, size, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        # void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t)
        self.mmap = _typed(libc.mmap, ptr, ptr, size, i, i, i, ctypes.c_long)
        # int munmap(void *addr, size_t len)
        self.munmap = _typed(libc.munmap, i, ptr, size)
        # void *mremap(void *old, size_t old_len, size_t new_len, int flags, ...)
        mremap = getattr(libc, "mremap", None)  # glibc only
        self.mremap = (
            None if mremap is None else _typed(mremap, ptr, ptr, size, size, i, ptr)
        )


def _typed(function: Any, restype: Any, *argtypes: Any) -> Any:
    """Sets a libc function's result and argument types; returns it."""
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


LIBC = _Libc() if HAS_MEMFD else None
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE if HAS_MEMFD else 0


def os_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def map_shared(fd: int, size: int) -> mmap.mmap:
    """Maps `size` bytes of the shared-memory file `fd`, and registers it.

    The `mmap` object is made anonymous, so it keeps no descriptor, and the
    file is then mapped over its range. Closing or freeing the object
    unmaps the file, as for any `mmap`.

    Raises:
        OSError: If the kernel refuses the mapping (`ENOMEM`: no memory, or
            `vm.max_map_count` mappings already).
    """
    assert LIBC is not None
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)  # a placeholder range
    view = ctypes.c_char.from_buffer(mm)
    address = ctypes.addressof(view)
    del view  # an exported buffer would stop `mm.close()`
    flags = mmap.MAP_SHARED | _MAP_FIXED
    if LIBC.mmap(address, size, PROT_RW, flags, fd, 0) != address:
        error = os_error("cannot map a shared-memory buffer")
        mm.close()
        raise error
    MAPPINGS[mm] = Extent(address, size)
    return mm


def make_private(extent: Extent) -> None:
    """Replaces a shared mapping, in place, by private memory with its bytes.

    Copies the first `extent.used` bytes (all, if unknown); the rest reads
    as zeros. Where `mremap` exists, the private copy moves over the range
    in one step, so a thread reading the array meanwhile never sees zeros.

    Raises:
        OSError: If the kernel refuses the private memory.
    """
    assert LIBC is not None
    address, length = extent.address, extent.length
    used = min(extent.used or length, length)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if LIBC.mremap is not None:
        copy = LIBC.mmap(None, length, PROT_RW, flags, -1, 0)
        if copy is None or copy == ctypes.c_void_p(-1).value:
            raise os_error("cannot copy a shared mapping")
        ctypes.memmove(copy, address, used)
        moved = LIBC.mremap(
            copy, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, address
        )
        if moved != address:
            error = os_error("cannot replace a shared mapping")
            LIBC.munmap(copy, length)
            raise error
        return
    saved = ctypes.string_at(address, used)
    if LIBC.mmap(address, length, PROT_RW, flags | _MAP_FIXED, -1, 0) != address:
        raise os_error("cannot replace a shared mapping")
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
    for mm, extent in list(MAPPINGS.items()):
        if mm.closed:
            continue
        try:
            mm.close()  # refused while arrays (exported buffers) use it
        except BufferError:
            try:
                make_private(extent)
            except OSError:
                continue
    MAPPINGS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=forget_inherited_mappings)


def send_fd(conn: Connection, fd: int) -> None:
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


def recv_fd(conn: Connection) -> int | None:
    """Receives one descriptor sent by `send_fd`; None if it did not fit.

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


def descriptor_error(count: int) -> OSError:
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
