"""State that belongs to one process: never copied, never used by a fork.

Two rules every object with workers, threads or locks follows, written once:

- `PerProcess`: what `_init_runtime()` builds (locks, thread pools, the
  engine) is per process. A copy (`pickle`, `copy.copy`, a worker's copy of
  the dataset) leaves it out and builds its own; the names left out are
  derived from `_init_runtime` itself, so the two never drift apart.
- `Owner`: the process that made an object. A fork of it inherits the
  object but not its workers or threads: `Owner.here()` tells them apart.

This module runs in workers too: it imports neither Keras nor a backend.
"""

from __future__ import annotations

import os
from typing import Any


class Owner:
    """The process that made an object (the one that called `Owner()`)."""

    __slots__ = ("pid",)

    def __init__(self) -> None:
        self.pid = os.getpid()

    def here(self) -> bool:
        """Whether this process is the owner (not a fork of it)."""
        return os.getpid() == self.pid


class PerProcess:
    """A base for objects whose `_init_runtime()` attributes are per process.

    `__getstate__` drops exactly the attributes `_init_runtime` sets, and
    `__setstate__` calls it again, so a copy starts with fresh ones.
    """

    def _init_runtime(self) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in _runtime_names(type(self)):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()


_NAMES: dict[type, frozenset[str]] = {}


def _runtime_names(cls: type[PerProcess]) -> frozenset[str]:
    """The attributes `cls._init_runtime` sets, read once from a bare instance
    (so `_init_runtime` must need no other attribute)."""
    names = _NAMES.get(cls)
    if names is None:
        probe = object.__new__(cls)
        cls._init_runtime(probe)
        names = _NAMES[cls] = frozenset(vars(probe))
    return names
