"""Argument checks: one integer check, one for seconds, the checks of the
dataset classes' own arguments (the loader, `set_epoch`'s position,
`num_workers`) and of how `PrefetchLoaderDataset`'s workers start.

Each raises an error that names the parameter and the value received, as
Keras's own checks do. This module runs in workers too: it imports neither
Keras nor a backend.
"""

from __future__ import annotations

import numbers
import operator
import warnings
from typing import Any

import numpy as np

# Keras's own parallelism, which the pool replaces.
_KERAS_PARALLELISM = ("workers", "use_multiprocessing", "max_queue_size")


def as_index(
    value: Any, name: str, *, minimum: int | None = None, what: str = "an integer"
) -> int:
    """`value` as an `int`, or an error naming `name`.

    Accepts what `operator.index` accepts (Python and NumPy integers, 0-d
    integer arrays) and refuses bools, Python's and NumPy's: `True` is never
    an intended count or index.

    Args:
        value: The argument received.
        name: The parameter's name, for the message.
        minimum: The smallest value allowed, or None.
        what: What the parameter must be, for the message (e.g.
            `"a positive integer"`).

    Returns:
        The integer.

    Raises:
        TypeError: If `value` is a bool or not an integer.
        ValueError: If `value` is below `minimum`.
    """
    if isinstance(value, (bool, np.bool_)):
        index = None
    else:
        try:
            index = operator.index(value)
        except TypeError:
            index = None
    if index is None:
        raise TypeError(
            f"`{name}` must be {what}. Received: {name}={value!r} "
            f"of type {type(value).__name__}"
        )
    if minimum is not None and index < minimum:
        raise ValueError(f"`{name}` must be {what}. Received: {name}={value}")
    return index


def as_seconds(value: Any, name: str) -> float | None:
    """A positive number of seconds, or None (`None` and `inf`: no limit).

    Raises:
        TypeError: If `value` is a bool or not a real number.
        ValueError: If `value` is not positive (NaN included).
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a number of seconds or None. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    seconds = float(value)
    if not seconds > 0:  # also NaN
        raise ValueError(f"`{name}` must be positive. Received: {name}={value}")
    return None if seconds == float("inf") else seconds


def check_loader(loader: Any, load_overridden: bool) -> None:
    """Checks `LoaderDataset`'s `loader`: callable, or None with a `load` override.

    Raises:
        TypeError: If `loader` is not callable, or is None while the class
            does not override `load`.
    """
    if loader is None:
        if not load_overridden:
            raise TypeError(
                "`loader` is required unless a subclass overrides "
                "`load(self, ids)`. Received: loader=None"
            )
    elif not callable(loader):
        raise TypeError(
            f"`loader` must be callable, as loader(ids) -> x. "
            f"Received: loader={loader!r} of type {type(loader).__name__}"
        )


def as_position(epoch: Any, batch: Any, per_epoch: int) -> tuple[int, int]:
    """`set_epoch`'s `(epoch, batch)`, checked: a place in the stream of batches.

    Returns:
        `(epoch, batch)` as ints.

    Raises:
        TypeError: If `epoch` or `batch` is not an integer.
        ValueError: If `epoch` is negative or `batch` not in `range(per_epoch)`.
    """
    epoch = as_index(epoch, "epoch")
    if epoch < 0:
        raise ValueError(f"`epoch` must be >= 0. Received: epoch={epoch}")
    batch = as_index(batch, "batch")
    if not 0 <= batch < per_epoch:
        raise ValueError(
            f"`batch` must be in range({per_epoch}), the batches of one "
            f"epoch. Received: batch={batch}"
        )
    return epoch, batch


def as_num_workers(num_workers: Any, per_epoch: int) -> int:
    """`num_workers`, reduced with a warning to the batches of one epoch.

    More workers than batches per epoch would hold no batch of their own.

    Raises:
        TypeError: If `num_workers` is not an integer.
        ValueError: If `num_workers` is below 1.
    """
    num_workers = as_index(
        num_workers, "num_workers", minimum=1, what="a positive integer"
    )
    if num_workers > per_epoch:
        warnings.warn(
            f"num_workers reduced from {num_workers} to {per_epoch}: there "
            f"are only {per_epoch} batches per epoch.",
            UserWarning,
            stacklevel=3,  # the dataset's constructor's caller
        )
        return per_epoch
    return num_workers


def refuse_keras_parallelism(kwargs: dict[str, Any]) -> None:
    """Refuses Keras's own `workers`, `use_multiprocessing`, `max_queue_size`."""
    for name in _KERAS_PARALLELISM:
        if name in kwargs:
            raise ValueError(
                f"PrefetchLoaderDataset loads in its own worker processes; "
                f"use `num_workers` instead of Keras's `{name}`. "
                f"Received: {name}={kwargs[name]!r}"
            )


def check_worker_args(start_method: Any, worker_init: Any, executor: Any) -> None:
    """Checks how workers start: `start_method`, `worker_init`, `executor`."""
    # Here, not at the top: workers import this module, never the pool's.
    from keras_oom.executor import Executor
    from keras_oom.launch import START_METHODS

    if start_method is not None and start_method not in START_METHODS:
        raise ValueError(
            f"`start_method` must be one of {START_METHODS} or None. "
            f"Received: start_method={start_method!r}"
        )
    if worker_init is not None and not callable(worker_init):
        raise TypeError(
            f"`worker_init` must be callable, as worker_init(worker_index). "
            f"Received: worker_init={worker_init!r}"
        )
    if executor is None:
        return
    if not isinstance(executor, Executor):
        raise TypeError(
            f"`executor` must implement keras_oom.executor.Executor "
            f"(start, submit, wait, take_events, ...), or be None. "
            f"Received: executor={executor!r}"
        )
    if start_method is not None:
        raise ValueError(
            f"`start_method` is for the local pool only; an executor "
            f"starts its workers its own way. Received: "
            f"start_method={start_method!r} with executor={executor!r}"
        )
